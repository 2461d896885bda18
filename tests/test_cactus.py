"""CACTUs task construction (tasks.cactus): partitions, pseudo-class episodes, the trainer's use.

Partitioners are checked for their invariants on synthetic embeddings; the episode sampler on a
dataset whose true labels are all one class (so it provably never reads them); the learning test
trains ProtoNets on MNIST from k-means of the pixels against random labels (randrand).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as RealKMeans

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.methods import get_method
from metalab.tasks.cactus import (
    CactusEpisodes,
    build_partitions,
    hyperplane_partitions,
    kmeans_partitions,
    random_partitions,
)


def blobs(k: int, per: int, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well-separated Gaussian blobs of ``per`` points in ``d`` dimensions, and their ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, size=(k, d))
    ids = np.repeat(np.arange(k), per)
    return (centres[ids] + rng.normal(0, 0.5, size=(k * per, d))).astype(np.float32), ids


def images(n: int) -> FewShotDataset:
    """``n`` distinct 4x4 images (image i has value i % 256 at pixel i % 16) whose true labels
    are all class 0, so a sampler that read them could not find its pseudo-classes."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x.view(n, -1)[torch.arange(n), torch.arange(n) % 16] = (torch.arange(n) % 255 + 1).to(
        torch.uint8
    )
    return FewShotDataset(x, np.zeros(n, dtype=np.int64), ["all"], "one-class")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings are the same partition up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_blobs_and_is_seeded():
    z, ids = blobs(6, 40)
    labels = kmeans_partitions(z, clusters=6, partitions=4, min_size=5, seed=0)
    assert labels.shape == (4, len(z)) and labels.dtype == np.int32
    assert same_partition(labels[0], ids)  # the unscaled partition finds the blobs
    assert all(np.bincount(p, minlength=6).min() > 0 for p in labels)
    np.testing.assert_array_equal(labels, kmeans_partitions(z, 6, 4, 5, seed=0))


class SpyKMeans:
    """scikit-learn's KMeans, recording what each fit saw; the first ``bad`` fits answer with
    every image in one cluster (a partition the size rule must reject)."""

    fits: list[tuple[np.ndarray, dict]] = []
    bad = 0

    def __init__(self, *args, **kwargs) -> None:
        self.kwargs, self.real = kwargs, RealKMeans(*args, **kwargs)

    def fit(self, x):
        SpyKMeans.fits.append((np.array(x), self.kwargs))
        self.real.fit(x)
        self.labels_ = self.real.labels_
        if SpyKMeans.bad:
            SpyKMeans.bad -= 1
            self.labels_ = np.zeros_like(self.labels_)
        return self


def test_kmeans_rescales_every_partition_after_the_first_and_redraws_small_ones(monkeypatch):
    import sklearn.cluster

    monkeypatch.setattr(sklearn.cluster, "KMeans", SpyKMeans)
    z, _ = blobs(6, 40)
    SpyKMeans.fits, SpyKMeans.bad = [], 0
    kmeans_partitions(z, clusters=6, partitions=1, min_size=5, seed=0)
    assert [kw["n_init"] for _, kw in SpyKMeans.fits] == [10]  # one partition: 10 restarts

    SpyKMeans.fits, SpyKMeans.bad = [], 1
    labels = kmeans_partitions(z, clusters=6, partitions=4, min_size=5, seed=0)
    seen = [x for x, _ in SpyKMeans.fits]
    assert len(seen) == 5 and {kw["n_init"] for _, kw in SpyKMeans.fits} == {1}
    np.testing.assert_array_equal(seen[0], z)  # rejected (one cluster), drawn again unscaled
    np.testing.assert_array_equal(seen[1], z)
    assert all(np.bincount(p, minlength=6).min() > 0 for p in labels)
    weights = [x[0] / z[0] for x in seen[2:]]  # partitions 1..3: z times one weight per dimension
    for x, w in zip(seen[2:], weights):
        np.testing.assert_allclose(x, z * w, rtol=1e-5)
        assert ((w >= 0) & (w <= 1)).all()
    assert len({tuple(np.round(w, 6)) for w in weights}) == 3  # a new weight vector each


def test_kmeans_size_rule_is_an_error_when_it_cannot_hold():
    z, _ = blobs(4, 10)
    with pytest.raises(ConfigError, match="cactus-clusters"):
        kmeans_partitions(z, clusters=4, partitions=1, min_size=10, seed=0)  # no cluster > 10


def test_hyperplane_cells_are_separated_by_the_margin():
    # In one dimension with 2 ways a partition is one hyperplane (a threshold): its two cells
    # are intervals on either side, at least 2 * margin apart, and the gap is left out (-1).
    z = np.linspace(-3, 3, 601, dtype=np.float64)[:, None]
    margin = 0.3
    labels = hyperplane_partitions(z, ways=2, partitions=5, margin=margin, min_size=5, seed=0)
    for p in labels:
        cells = [z[p == c, 0] for c in np.unique(p[p >= 0])]
        assert len(cells) == 2 and (p == -1).any()
        low, high = sorted(cells, key=np.min)
        assert high.min() - low.max() >= 2 * margin - 1e-9
    # ways=5 needs ceil(log2 5) = 3 hyperplanes: at least 5 cells of min_size or more.
    z8, _ = blobs(8, 60, d=4)
    labels = hyperplane_partitions(z8 / 20, ways=5, partitions=3, margin=0.01, min_size=6, seed=0)
    for p in labels:
        counts = np.bincount(p[p >= 0])
        assert (counts[counts > 0] >= 6).all() and (counts >= 6).sum() >= 5


def test_hyperplane_margin_too_wide_is_an_error():
    z = np.random.default_rng(0).uniform(-1, 1, size=(200, 2))
    with pytest.raises(ConfigError, match="margin"):
        hyperplane_partitions(z, ways=4, partitions=1, margin=5.0, min_size=5, seed=0, splits=2)


def test_random_partitions_are_uniform_and_seeded():
    labels = random_partitions(20_000, clusters=10, partitions=3, seed=4)
    counts = np.bincount(labels[0], minlength=10)
    assert labels.shape == (3, 20_000) and abs(counts / 20_000 - 0.1).max() < 0.01
    np.testing.assert_array_equal(labels, random_partitions(20_000, 10, 3, seed=4))
    assert not np.array_equal(labels[0], labels[1])


def test_episodes_draw_distinct_pseudo_classes_of_one_partition():
    n = 300
    rng = np.random.default_rng(0)
    partitions = rng.integers(0, 12, size=(3, n)).astype(np.int32)
    partitions[1, :40] = -1  # left out of partition 1
    partitions[2] = np.where(partitions[2] == 5, 11, partitions[2])  # class 5 empty in partition 2
    small = np.flatnonzero(partitions[0] == 7)[4:]
    partitions[0, small] = 8  # class 7 of partition 0 keeps only 4 images: never drawn at K+Q=6
    sampler = CactusEpisodes(images(n), partitions, ways=4, shots=1, queries=5, seed=3)
    assert 7 not in sampler.parts[0].eligible and 5 not in sampler.parts[2].eligible
    for _ in range(200):
        index = sampler.sample_indices()
        assert index.shape == (4, 6) and len(np.unique(index)) == 24
        # One partition holds all rows, each row one of its classes, the rows distinct classes.
        fits = [
            p
            for p in range(3)
            if all(len(np.unique(partitions[p][row])) == 1 for row in index)
            and len({partitions[p][row[0]] for row in index}) == 4
            and (partitions[p][index] >= 0).all()
        ]
        assert fits
        if fits == [0]:
            assert 7 not in partitions[0][index[:, 0]]
    batch = sampler.sample_batch(5)
    assert batch.support_x.shape == (5, 4, 1, 4, 4) and batch.query_x.shape == (5, 20, 1, 4, 4)
    assert batch.support_y[0].tolist() == [0, 1, 2, 3]


def test_episodes_resume_from_state_and_reject_what_cannot_fill_a_task():
    partitions = random_partitions(200, clusters=5, partitions=2, seed=0)
    sampler = CactusEpisodes(images(200), partitions, ways=3, shots=2, queries=3, seed=1)
    sampler.sample_indices()
    state = sampler.state()
    ahead = [sampler.sample_indices() for _ in range(3)]
    sampler.set_state(state)
    for expected in ahead:
        np.testing.assert_array_equal(sampler.sample_indices(), expected)
    with pytest.raises(ConfigError, match="pseudo-classes"):
        CactusEpisodes(images(200), partitions, ways=6, shots=1, queries=1)  # only 5 clusters
    with pytest.raises(ConfigError, match="200"):
        CactusEpisodes(images(100), partitions, ways=3, shots=1, queries=1)
    with pytest.raises(ConfigError, match="alphabet"):
        sampler.mix_alphabets(0.5)


def test_build_partitions_needs_an_embedding_for_kmeans():
    with pytest.raises(ConfigError, match="cactus-embedding"):
        build_partitions(
            "kmeans", None, 100, ways=5, min_size=2, clusters=10, partitions=1, margin=1.0, seed=0
        )
    assert build_partitions(
        "random", None, 100, ways=5, min_size=2, clusters=10, partitions=2, margin=1.0, seed=0
    ).shape == (2, 100)


@pytest.mark.realdata
def test_trainer_refuses_a_missing_or_mismatched_embedding(omniglot_root, tmp_path):
    from metalab.train import train

    config = get_method("protonet").recipe("cactus-omniglot-cpu").updated(episodes=2)
    with pytest.raises(ConfigError, match="cactus-embedding"):
        train("protonet", config, tmp_path / "a", progress=False, data_root=omniglot_root)
    other = tmp_path / "emb"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"method": "acai", "data": "mnist", "split": "standard", "train_part": "train"})
    )
    with pytest.raises(ConfigError, match="same images"):
        train(
            "protonet",
            config.updated(cactus_embedding=str(other)),
            tmp_path / "b",
            progress=False,
            data_root=omniglot_root,
        )


@pytest.mark.realdata
def test_cactus_tasks_from_pixel_kmeans_beat_random_labels(mnist_root, tmp_path):
    """The paper's ordering CACTUs > randrand, in seconds: ProtoNets on MNIST trained for 200
    episodes on k-means pseudo-classes of the pixels (k = 10, one partition) against random
    labels, then tested on labelled 10-way 1-shot episodes of the test images."""
    from metalab.evaluate import evaluate_run
    from metalab.train import train

    torch.set_num_threads(1)
    base = (
        get_method("protonet")
        .recipe("cactus-mnist")
        .updated(
            episodes=200, queries=5, cactus_partitions=1, cactus_embedding="pixels", bf16="off"
        )
    )
    accuracy = {}
    for how in ("kmeans", "random"):
        run = tmp_path / how
        train("protonet", base.updated(cactus=how), run, progress=False, data_root=mnist_root)
        # No protocol given: the CACTUs table of the dataset (MNIST 10-way 1/5/10-shot, 5 queries).
        results = evaluate_run(run, None, episodes=100, data_root=mnist_root).results
        assert [(r.protocol["ways"], r.protocol["shots"]) for r in results] == [
            (10, 1),
            (10, 5),
            (10, 10),
        ]
        assert {r.protocol["queries"] for r in results} == {5}
        assert (
            results[0]
            .protocol["training_tasks"]
            .startswith("CACTUs k-means k=10 P=1" if how == "kmeans" else "randrand k=10 P=1")
        )
        accuracy[how] = results[0].mean
    assert accuracy["kmeans"] > accuracy["random"] + 0.10, accuracy
    assert accuracy["kmeans"] > 0.4, accuracy  # chance is 0.1
