"""The embedding baselines of CACTUs (metalab.evaluate.embedding): 1-NN, logistic regression, MLP
and cluster matching on synthetic embeddings, and on raw Omniglot pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metalab.evaluate import embedding as emb
from metalab.evaluate.embedding import (
    BASELINES,
    cluster_matching,
    evaluate_baselines,
    fit_clusters,
    logistic_regression,
    mlp,
    nearest_neighbour,
)


def blobs(classes: int, per_class: int, dim: int, spread: float, seed: int):
    """Gaussian blobs around far-apart centres: ``(classes*per_class, dim)`` and the labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + rng.normal(0, spread, (len(labels), dim))).astype(np.float32), labels


def episode_indices(labels: np.ndarray, episodes: int, ways: int, per_class: int, seed: int):
    """``(episodes, ways, per_class)`` example indices, row i one class (as fixed_indices)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.stack(
        [
            np.stack(
                [rng.choice(by_class[c], per_class, replace=False) for c in rng.choice(len(by_class), ways, replace=False)]
            )
            for _ in range(episodes)
        ]
    )  # fmt: skip


def test_separable_blobs_every_baseline_is_near_perfect():
    z, y = blobs(classes=12, per_class=20, dim=16, spread=0.5, seed=0)
    z_train, _ = blobs(classes=12, per_class=50, dim=16, spread=0.5, seed=0)  # same centres
    indices = episode_indices(y, episodes=40, ways=5, per_class=6, seed=1)
    results = evaluate_baselines(z, indices, 1, z_train=z_train, clusters=12)
    assert list(results) == list(BASELINES)
    for name, r in results.items():
        assert r.mean > 0.98, (name, r)
        assert r.protocol["baseline"] == name
        assert (r.protocol["ways"], r.protocol["shots"], r.protocol["queries"]) == (5, 1, 5)
        assert r.protocol["episodes"] == 40
    assert results["cluster-matching"].protocol["clusters"] == 12


def test_random_labels_every_baseline_is_near_chance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 16)).astype(np.float32)
    y = rng.integers(0, 30, 600)  # labels that say nothing about the embedding
    indices = episode_indices(y, episodes=200, ways=5, per_class=6, seed=2)
    results = evaluate_baselines(
        z, indices, 1, z_train=rng.normal(size=(500, 16)), clusters=20, mlp_options={"steps": 30}
    )
    for name, r in results.items():
        # 200 episodes of 25 queries: sd of the mean ~ 0.018 around 0.2
        assert abs(r.mean - 0.2) < 0.07, (name, r)


def test_cluster_matching_follows_its_definition():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z_support = np.array([[0.5, 0], [0, 0.5], [-0.5, 0], [10, 0.5], [0, 9.5], [0.5, 10]])
    y_support = np.array([1, 1, 0, 0, 2, 1])
    # cluster 0: labels 1, 1, 0 -> 1 (majority); cluster 1: 0; cluster 2: 2, 1 -> 1 (tie: smaller);
    # cluster 3 holds no support example, so no query can land there.
    z_query = np.array([[1, 1], [9, 1], [1, 9], [10, 9], [9, 10.5]])
    # The last two are nearest centroid 3, unmatched: (10, 9) is nearer 1 than 2, (9, 10.5) nearer 2.
    expected = np.array([1, 0, 1, 0, 1])
    np.testing.assert_array_equal(
        cluster_matching(z_support, y_support, z_query, centroids), expected
    )

    class Fitted:  # what a fitted KMeans offers
        cluster_centers_ = centroids

    np.testing.assert_array_equal(
        cluster_matching(z_support, y_support, z_query, Fitted()), expected
    )


def test_fit_clusters_finds_separated_clusters():
    z, y = blobs(classes=6, per_class=30, dim=4, spread=0.1, seed=3)
    kmeans = fit_clusters(z, 6, seed=0, n_init=3)
    assert kmeans.cluster_centers_.shape == (6, 4)
    assert len({tuple(sorted(set(kmeans.labels_[y == c]))) for c in range(6)}) == 6
    assert all(len(set(kmeans.labels_[y == c])) == 1 for c in range(6))


def test_nearest_neighbour_is_the_nearest_support_example():
    z_support = np.array([[0.0], [1.0], [5.0]])
    assert nearest_neighbour(
        z_support, np.array([7, 8, 9]), np.array([[0.4], [0.6], [4.0]])
    ).tolist() == [7, 8, 9]


def test_mlp_and_logistic_regression_are_deterministic():
    z, y = blobs(classes=5, per_class=4, dim=8, spread=8.0, seed=4)  # overlapping: answers vary
    rng = np.random.default_rng(0)
    z_query = rng.normal(0, 10, (50, 8))
    first = mlp(z, y, z_query, seed=7, steps=20)
    np.testing.assert_array_equal(first, mlp(z, y, z_query, seed=7, steps=20))
    assert first.shape == (50,)
    # A batch of one episode is the same network as the episode alone.
    batched = mlp(z[None], y[None], z_query[None], seed=7, steps=20)
    np.testing.assert_array_equal(batched[0], first)
    np.testing.assert_array_equal(
        logistic_regression(z, y, z_query), logistic_regression(z, y, z_query)
    )
    indices = episode_indices(y, episodes=30, ways=5, per_class=3, seed=5)
    a = evaluate_baselines(z, indices, 1, ["mlp", "logistic-regression"], seed=3)
    b = evaluate_baselines(z, indices, 1, ["mlp", "logistic-regression"], seed=3)
    assert {k: v.mean for k, v in a.items()} == {k: v.mean for k, v in b.items()}


def test_every_baseline_sees_the_same_episodes(monkeypatch):
    """The embedding of example i is (i,), so the support each baseline gets names its rows."""
    z = np.arange(60, dtype=np.float32)[:, None]
    labels = np.repeat(np.arange(10), 6)
    indices = episode_indices(labels, episodes=7, ways=5, per_class=3, seed=6)
    seen: dict[str, list] = {}

    def recording(name, batched=False):
        def answer(z_support, y_support, z_query, *args, **kwargs):
            support = np.asarray(z_support)[..., 0].astype(int)
            query = np.asarray(z_query)[..., 0].astype(int)
            pairs = zip(support, query) if batched else [(support, query)]
            seen.setdefault(name, []).extend((s.tolist(), q.tolist()) for s, q in pairs)
            return np.zeros(query.shape, dtype=int)

        return answer

    monkeypatch.setattr(emb, "nearest_neighbour", recording("nearest-neighbour"))
    monkeypatch.setattr(emb, "logistic_regression", recording("logistic-regression"))
    monkeypatch.setattr(emb, "mlp", recording("mlp", batched=True))
    monkeypatch.setattr(emb, "cluster_matching", recording("cluster-matching"))
    evaluate_baselines(z, indices, 1, clusters=np.zeros((2, 1)))
    expected = [(e[:, :1].reshape(-1).tolist(), e[:, 1:].reshape(-1).tolist()) for e in indices]
    assert set(seen) == set(BASELINES)
    for name, episodes in seen.items():
        assert episodes == expected, name


def test_unknown_baseline_and_missing_clusters_are_config_errors():
    from metalab.errors import ConfigError

    z = np.zeros((10, 2), dtype=np.float32)
    indices = np.arange(10).reshape(1, 5, 2)
    with pytest.raises(ConfigError, match="unknown baseline"):
        evaluate_baselines(z, indices, 1, ["knn"])
    with pytest.raises(ConfigError, match="needs clusters"):
        evaluate_baselines(z, indices, 1, ["cluster-matching"])


def _pixels(dataset) -> np.ndarray:
    return dataset.gather(np.arange(len(dataset.images))).reshape(len(dataset.images), -1).numpy()


@pytest.mark.realdata
def test_raw_pixel_nearest_neighbour_beats_chance_on_omniglot(omniglot_root):
    from metalab.data.datasets import load_dataset
    from metalab.evaluate.protocol import EVAL_SEED
    from metalab.tasks.episodes import EpisodeSampler

    test = load_dataset("omniglot", "cactus", "test", 28, omniglot_root)
    sampler = EpisodeSampler(test, 5, 1, 5, seed=EVAL_SEED)
    results = evaluate_baselines(
        _pixels(test), sampler.fixed_indices(300), 1, ["nearest-neighbour"]
    )
    # Measured: 43.0 ± 1.2% on these 300 episodes (42.4 ± 0.7% on 1000); chance is 20%.
    assert results["nearest-neighbour"].mean > 0.35


@pytest.mark.realdata
def test_report_embedding_writes_every_protocol(omniglot_root, tmp_path, monkeypatch):
    """`metalab eval` of an embedding run, with the run's embedding replaced by 16 random
    projections of the pixels and a small k (the real k-means of 22k images takes minutes)."""
    import types

    from metalab.methods import embedding as methods_embedding

    projection = np.random.default_rng(0).normal(size=(784, 16)).astype(np.float32)
    monkeypatch.setattr(
        methods_embedding, "embeddings_of", lambda run_dir, dataset, device=None: _pixels(dataset) @ projection
    )  # fmt: skip
    monkeypatch.setitem(emb.CLUSTERS, "omniglot", 20)
    config = types.SimpleNamespace(
        data="omniglot", split="cactus", image_size=28, train_part="train"
    )
    method = types.SimpleNamespace(name="fake-embedding", config=config)
    found = emb.report_embedding(
        method, tmp_path, episodes=10, device="cpu", data_root=omniglot_root
    )
    assert list(found) == [(5, 1), (5, 5), (20, 1), (20, 5)]
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert stored["method"] == "fake-embedding"
    assert len(stored["results"]) == 4 * len(BASELINES)
    for row in stored["results"]:
        p = row["protocol"]
        assert p["dataset"] == "omniglot/cactus/test" and p["split"] == "cactus"
        assert p["queries"] == 5 and p["episodes"] == 10 and p["seed"] == emb.EVAL_SEED
        assert 0.0 <= row["mean"] <= 1.0
    assert list(tmp_path.glob("kmeans-*-k20-*.npy"))  # the centroids are cached
