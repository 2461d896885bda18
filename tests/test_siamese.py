"""Siamese networks (Koch et al. 2015) and Koch's one-shot protocols, on real Omniglot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import (
    evaluate,
    evaluate_verification,
    evaluate_within_alphabet,
    within_alphabet_by_alphabet,
)
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.methods.siamese import Siamese, SiameseConfig, pair_indices
from metalab.nets.koch import KochNet
from metalab.rundir import load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.tasks.oneshot import (
    HELD_OUT_DRAWERS,
    alphabet,
    trial_alphabets,
    verification_pairs,
    within_alphabet_trials,
)
from metalab.tasks.transforms import affine_distort
from metalab.train import train


@pytest.fixture(scope="module")
def lake_test(omniglot_root):
    return omniglot("lake", "test", omniglot_root)


def _drawer(dataset, index: np.ndarray) -> np.ndarray:
    """The drawing index (drawer - 1) of each example: its column in ``class_index``."""
    rows = dataset.class_index[dataset.labels[index]]
    return np.argmax(rows == index[..., None], axis=-1)


# -- distortions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 105])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distortions_keep_size_and_dtype_and_change_images(size, dtype):
    images = torch.zeros(16, 1, size, size, dtype=dtype)
    images[:, :, size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = 1.0  # a stroke
    out = affine_distort(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype
    changed = (out - images).abs().amax((1, 2, 3)) > 1e-3
    assert changed.sum() >= 14  # all but the 1/128 drawn with every component off


def test_distortions_are_the_identity_when_off():
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(affine_distort(images, p=0.0), images)
    neutral = affine_distort(images, p=1.0, rotation=0, shear=0, scale=(1, 1), translation=0)
    torch.testing.assert_close(neutral, images, atol=1e-5, rtol=0)


def test_distortions_are_fixed_by_the_generator():
    images = torch.rand(8, 1, 105, 105)
    a = affine_distort(images, torch.Generator().manual_seed(3))
    b = affine_distort(images, torch.Generator().manual_seed(3))
    c = affine_distort(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_translation_moves_ink_by_at_most_two_pixels():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 14] = 1.0
    out = affine_distort(image.expand(64, -1, -1, -1), torch.Generator().manual_seed(0), p=1.0,
                         rotation=0, shear=0, scale=(1, 1))  # fmt: skip
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = out.sum((1, 2, 3))
    cy, cx = (out[:, 0] * ys).sum((1, 2)) / mass, (out[:, 0] * xs).sum((1, 2)) / mass
    assert (cy - 14).abs().max() <= 2 + 1e-4 and (cx - 14).abs().max() <= 2 + 1e-4
    assert (cx - 14).abs().max() > 1  # it does move


# -- the networks -----------------------------------------------------------------------------------


def test_koch_net_maps_105_pixels_to_4096_sigmoid_features():
    torch.manual_seed(0)
    net = KochNet(105)
    assert net.fc.in_features == 256 * 6 * 6
    h = net(torch.rand(3, 1, 105, 105))
    assert h.shape == (3, 4096) and h.min() >= 0 and h.max() <= 1
    with pytest.raises(ConfigError, match="too small for the koch net"):
        KochNet(28)


@pytest.mark.parametrize("net,size", [("conv4", 28), ("koch", 105)])
def test_l1_head_is_symmetric(net, size):
    torch.manual_seed(0)
    siamese = Siamese(SiameseConfig(net=net, image_size=size)).eval()
    x1, x2 = torch.rand(4, 1, size, size), torch.rand(4, 1, size, size)
    with torch.no_grad():
        p12, p21 = siamese.pair_probability(x1, x2), siamese.pair_probability(x2, x1)
    assert p12.shape == (4,) and ((p12 > 0) & (p12 < 1)).all()
    torch.testing.assert_close(p12, p21)


def test_predict_is_the_best_pair_of_each_class():
    torch.manual_seed(0)
    siamese = Siamese(SiameseConfig(hidden=16)).eval()
    support, query = torch.rand(6, 1, 28, 28), torch.rand(4, 1, 28, 28)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        logits = siamese.predict(support, labels, query)
        p = siamese.pair_probability(query.repeat_interleave(6, 0), support.repeat(4, 1, 1, 1))
    best = p.view(4, 3, 2).amax(-1)
    torch.testing.assert_close(torch.sigmoid(logits), best)


def test_bad_configs_and_image_sizes_are_refused():
    with pytest.raises(ConfigError, match="net='resnet'"):
        Siamese(SiameseConfig(net="resnet"))
    with pytest.raises(ConfigError, match="ways 2 or more"):
        Siamese(SiameseConfig(ways=1))
    with pytest.raises(ConfigError, match="load the data at size=28"):
        Siamese(SiameseConfig()).embed(torch.rand(2, 1, 105, 105))


# -- pairs ------------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("tasks", [0, 3])  # 0: one Episode, 3: a TaskBatch
def test_pairs_are_half_same_half_different_classes(omniglot_root, tasks):
    dataset = omniglot("lake", "train", omniglot_root)
    sampler = EpisodeSampler(dataset, ways=16, shots=2, queries=3, seed=1)
    indices = np.stack([sampler.sample_indices() for _ in range(max(tasks, 1))])  # (T, N, K+Q)
    batch = sampler.episode_from_indices(indices if tasks else indices[0])
    # Example index of each image of cat([support of every task, query of every task]).
    images = np.concatenate([indices[..., :2].reshape(-1), indices[..., 2:].reshape(-1)])
    for shift in (1, 7, 15):
        first, second, same = pair_indices(batch.support_y, batch.query_y, 2, shift)
        assert len(first) == 2 * max(tasks, 1) * 16 * 3 and same.mean() == 0.5
        class_1, class_2 = dataset.labels[images[first]], dataset.labels[images[second]]
        assert (first < max(tasks, 1) * 32).all() and (second >= max(tasks, 1) * 32).all()
        np.testing.assert_array_equal(class_1 == class_2, same.numpy() == 1)
        assert len(set(images[first]) & set(images[second])) == 0  # never an image with itself
    siamese = Siamese(SiameseConfig(hidden=8, ways=16, shots=2, queries=3))
    loss, metrics = siamese.meta_loss(batch)
    loss.backward()
    assert loss.isfinite() and 0 <= metrics["acc"] <= 1


# -- Koch's protocols -------------------------------------------------------------------------------


@pytest.mark.realdata
def test_within_alphabet_trials(lake_test):
    support, query = within_alphabet_trials(lake_test, trials=400, seed=5)
    assert support.shape == query.shape == (400, 20)
    labels = lake_test.labels
    np.testing.assert_array_equal(labels[support], labels[query])  # query j is class j
    alphabets = [{alphabet(lake_test.class_names[c]) for c in row} for row in labels[support]]
    assert all(len(a) == 1 for a in alphabets)  # one alphabet per trial
    assert all(len(set(row)) == 20 for row in labels[support])  # 20 distinct characters
    counts = {}
    for a in alphabets:
        counts[next(iter(a))] = counts.get(next(iter(a)), 0) + 1
    assert len(counts) == 20 and set(counts.values()) == {20}  # spread evenly
    drawer_s, drawer_q = _drawer(lake_test, support), _drawer(lake_test, query)
    assert (drawer_s == drawer_s[:, :1]).all() and (drawer_q == drawer_q[:, :1]).all()
    assert (drawer_s[:, 0] != drawer_q[:, 0]).all()  # two different drawers
    again, _ = within_alphabet_trials(lake_test, trials=10, seed=5)
    np.testing.assert_array_equal(again, support[:10])  # trial i depends only on (seed, i)
    other, _ = within_alphabet_trials(lake_test, trials=10, seed=6)
    assert not np.array_equal(other, support[:10])


@pytest.mark.realdata
def test_the_fixed_within_alphabet_set_covers_every_alphabet_and_adds_up(lake_test, omniglot_root):
    """The default 1000 trials: 50 in each of the 20 evaluation alphabets, none of a background
    alphabet; per-alphabet results weighted by their trials give the overall accuracy."""
    names = trial_alphabets(lake_test, 1000)
    assert len(set(names)) == 20 and all(names.count(a) == 50 for a in set(names))
    background = {alphabet(c) for c in omniglot("lake", "trainval", omniglot_root).class_names}
    evaluation = {alphabet(c) for c in lake_test.class_names}
    assert len(background) == 30 and len(evaluation) == 20 and not evaluation & background
    support, _ = within_alphabet_trials(lake_test, trials=40)
    trial_alphabet = [alphabet(lake_test.class_names[lake_test.labels[row[0]]]) for row in support]
    assert trial_alphabet == names[:40]  # the builder and the table agree on each trial's alphabet
    torch.manual_seed(0)
    method = ProtoNet(ProtoNetConfig(hidden=8, split="lake"))
    overall, by_alphabet = within_alphabet_by_alphabet(method, lake_test, trials=40)
    assert sorted(by_alphabet) == sorted(set(names))
    counts = [r.protocol["episodes"] for r in by_alphabet.values()]
    assert sum(counts) == 40 == overall.protocol["episodes"]
    weighted = sum(r.mean * r.protocol["episodes"] for r in by_alphabet.values()) / 40
    assert weighted == pytest.approx(overall.mean, abs=1e-12)
    assert overall.mean == evaluate_within_alphabet(method, lake_test, trials=40).mean


@pytest.mark.realdata
def test_verification_pairs(lake_test):
    first, second, same = verification_pairs(lake_test, pairs=4000, seed=5)
    assert len(first) == 4000 and same.sum() == 2000
    labels = lake_test.labels
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    drawer_1, drawer_2 = _drawer(lake_test, first), _drawer(lake_test, second)
    assert set(drawer_1) | set(drawer_2) == set(HELD_OUT_DRAWERS)  # drawers 17-20 only
    assert (drawer_1 != drawer_2).all()
    again = verification_pairs(lake_test, pairs=4000, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(again, (first, second, same)))
    with pytest.raises(ConfigError, match="even number"):
        verification_pairs(lake_test, pairs=3)
    with pytest.raises(ConfigError, match="no pair score"):
        evaluate_verification(ProtoNet(ProtoNetConfig()), lake_test, pairs=10)


# -- learning ---------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_siamese_learns_omniglot_quickly(omniglot_root, lake_test, tmp_path, one_thread):
    config = Siamese.recipe("lake").updated(ways=32, hidden=32, episodes=600, val_every=0)
    train("siamese", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    siamese, _ = load_method(tmp_path / "run" / "best.pt")
    five_way = evaluate(siamese, EpisodeSampler(lake_test, 5, 1, 5, seed=7), episodes=60)
    verification = evaluate_verification(siamese, lake_test, pairs=1000)
    within = evaluate_within_alphabet(siamese, lake_test, trials=20)
    print(f"5-way 1-shot {five_way}, verification {verification}, 20-way within {within}")
    assert five_way.mean >= 0.6, five_way  # chance 0.2
    assert verification.mean >= 0.7, verification  # chance 0.5
    assert within.mean >= 0.2, within  # chance 0.05
