"""EpisodeSampler invariants, determinism and errors, on real Omniglot and on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.tasks.episodes import EpisodeSampler


def toy(counts: list[int], size: int = 4) -> FewShotDataset:
    """Each example's pixels hold its own index, so images can be traced back to examples."""
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 1, size, size)
    return FewShotDataset(
        images.to(torch.uint8), labels, [f"c{i}" for i in range(len(counts))], "toy"
    )


def example_ids(x: torch.Tensor) -> np.ndarray:
    return (x[..., 0, 0, 0] * 255).round().long().numpy()


def test_episode_invariants_unequal_class_sizes():
    data = toy([7, 3, 9, 5, 12, 4, 6])
    sampler = EpisodeSampler(data, ways=4, shots=2, queries=3, seed=1)
    seen_labels = set()
    for _ in range(200):
        e = sampler.sample()
        assert e.support_x.shape == (8, 1, 4, 4) and e.query_x.shape == (12, 1, 4, 4)
        assert e.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert e.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        support, query = example_ids(e.support_x), example_ids(e.query_x)
        assert len(set(support) | set(query)) == 20  # no example twice
        classes = data.labels[support]
        # every support and query example carries its class's episode label
        for label in range(4):
            cls = set(data.labels[support[e.support_y.numpy() == label]])
            assert cls == set(data.labels[query[e.query_y.numpy() == label]]) and len(cls) == 1
        assert len(set(classes)) == 4  # 4 distinct classes
        assert not {1, 5} & set(classes)  # too few examples for shots + queries = 5
        seen_labels.add(tuple(data.labels[support[::2]]))
    assert len(seen_labels) > 50  # label assignment changes between episodes


@pytest.mark.realdata
def test_determinism_and_fixed_sets(omniglot_root):
    data = omniglot("vinyals", "val", omniglot_root)
    a = EpisodeSampler(data, 5, 1, 15, seed=3)
    b = EpisodeSampler(data, 5, 1, 15, seed=3)
    c = EpisodeSampler(data, 5, 1, 15, seed=4)
    ea, eb, ec = a.sample(), b.sample(), c.sample()
    assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
    assert not torch.equal(ea.support_x, ec.support_x)
    # the fixed set ignores the stream's position, and 600 episodes are a prefix of 1000
    fixed = a.fixed_indices(1000)
    a.sample()
    assert np.array_equal(a.fixed_indices(600), fixed[:600])
    # a pinned value: the same seed gives these episodes on any machine (PCG64 is portable)
    first = EpisodeSampler(data, 5, 1, 1, seed=0).fixed_indices(1)[0]
    assert first.tolist() == PINNED_FIRST_EPISODE


# recorded once from this implementation; a change here means old fixed test sets changed too
PINNED_FIRST_EPISODE = [[8726, 8735], [7007, 7010], [3714, 3708], [4224, 4221], [11627, 11623]]


def test_state_roundtrip_continues_the_stream():
    data = toy([10] * 20)
    a = EpisodeSampler(data, 5, 1, 3, seed=0)
    a.sample()
    state = a.state()
    expected = [a.sample_indices() for _ in range(3)]
    b = EpisodeSampler(data, 5, 1, 3, seed=99)
    b.set_state(state)
    assert all(np.array_equal(b.sample_indices(), e) for e in expected)


def test_task_batch_shapes():
    sampler = EpisodeSampler(toy([10] * 20), 5, 2, 3, seed=0)
    batch = sampler.sample_batch(4)
    assert batch.tasks == 4
    assert batch.support_x.shape == (4, 10, 1, 4, 4) and batch.query_x.shape == (4, 15, 1, 4, 4)
    assert batch.support_y.shape == (4, 10) and batch.query_y.shape == (4, 15)
    assert batch.support_x.dtype == torch.float32 and float(batch.support_x.max()) <= 1.0


def test_too_many_ways():
    with pytest.raises(ConfigError, match=r"ways=30 is more than the 20 classes of toy"):
        EpisodeSampler(toy([10] * 20), ways=30, shots=1, queries=1)


def test_too_many_shots_and_queries():
    with pytest.raises(ConfigError, match=r"shots\+queries=21 .*at most 20 per class"):
        EpisodeSampler(toy([20] * 30), ways=5, shots=1, queries=20)


def test_nonpositive_settings():
    with pytest.raises(ConfigError, match="shots=0"):
        EpisodeSampler(toy([10] * 20), ways=5, shots=0, queries=1)


def test_fixed_set_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    sampler = EpisodeSampler(toy([10] * 20), 5, 1, 3, seed=5)
    first = sampler.fixed_indices(10)
    (cached,) = tmp_path.glob("episodes-*-5w1s3q-5.npy")
    assert np.array_equal(np.load(cached), first)
    assert np.array_equal(sampler.fixed_indices(4), first[:4])  # served from the file
    assert np.array_equal(sampler.fixed_indices(12)[:10], first)  # grown, same prefix


@pytest.mark.realdata
def test_labelled_fraction_hides_the_rest_and_keeps_them_for_the_oracle(omniglot_root):
    from metalab.data.omniglot import omniglot
    from metalab.tasks.episodes import UNLABELLED

    data = omniglot("vinyals", "val", omniglot_root)
    sampler = EpisodeSampler(data, ways=5, shots=5, queries=2, seed=3, labelled=1)
    batch = sampler.sample_batch(4)
    shown = batch.support_y != UNLABELLED
    assert shown.sum(-1).tolist() == [5, 5, 5, 5]  # one per class in each task
    assert torch.equal(batch.oracle_y[shown], batch.support_y[shown])
    assert sorted(batch.support_y[0][shown[0]].tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(batch.oracle_y[0], torch.arange(5).repeat_interleave(5))
    assert sampler.protocol()["labelled"] == 1
    # the same episodes as a fully labelled sampler of the same seed
    full = EpisodeSampler(data, ways=5, shots=5, queries=2, seed=3).sample_batch(4)
    assert torch.equal(full.support_x, batch.support_x) and full.oracle_y is None
    with pytest.raises(ConfigError, match="labelled=6"):
        EpisodeSampler(data, ways=5, shots=5, queries=2, labelled=6)
