"""Ambiguous attribute tasks (our substitute for PLATIPUS's CelebA experiment) and the coverage
protocol, on real Omniglot images: the attributes are distinct and composed in one order, the task
family keeps its invariants (labels, which images carry which attributes, query labels that follow
the hidden pair, disjoint splits, seeds, checkpoints, fixed sets as prefixes), coverage counts what
hand-built classifiers of known behaviour cover, MAML learns on the recipe, and PLATIPUS's draws
give coverage through `metalab eval`."""

from __future__ import annotations

import json
from dataclasses import fields
from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from metalab.data.datasets import load_dataset
from metalab.errors import ConfigError
from metalab.evaluate.coverage import METRICS, consistent_pairs, evaluate_coverage
from metalab.methods.maml import MAML, MAMLConfig
from metalab.methods.platipus import PLATIPUS
from metalab.rundir import load_method
from metalab.tasks.attributes import (
    ATTRIBUTES,
    PAIRS,
    TEST_ATTRIBUTES,
    TRAIN_ATTRIBUTES,
    AttributeTasks,
    apply_attributes,
    omniglot_attribute_tasks,
)
from metalab.train import train

pytestmark = pytest.mark.realdata
K, Q, M = 5, 6, 4  # support and query images per class, probes per pair


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def pool(omniglot_root) -> torch.Tensor:
    """The test part of the Vinyals split, uint8 ``(N, 1, 28, 28)``, ink = 255."""
    return load_dataset("omniglot", "vinyals", "test", 28, omniglot_root).images


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


# -- the attributes ------------------------------------------------------------------------------
def test_attributes_are_distinct_deterministic_and_composed_in_one_order(pool):
    assert len(ATTRIBUTES) == 10
    assert not set(TRAIN_ATTRIBUTES) & set(TEST_ATTRIBUTES)  # test attributes are never trained on
    assert set(TRAIN_ATTRIBUTES) | set(TEST_ATTRIBUTES) == set(ATTRIBUTES)
    x = as_float(pool[:64])
    assert x.amax() == 1 and x.mean() < 0.2  # ink is 1 on a 0 background
    outputs = {}
    for name, transform in ATTRIBUTES.items():
        y = transform(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, name
        assert torch.equal(y, transform(x)), name  # deterministic
        assert (y - x).abs().flatten(1).amax(1).min() > 0.2, name  # changes every image
        outputs[name] = y
    for a, b in combinations(ATTRIBUTES, 2):  # visually distinct from each other
        assert (outputs[a] - outputs[b]).abs().mean() > 0.01, (a, b)
    # The canonical order, whatever the order of the names.
    names = list(ATTRIBUTES)
    present = torch.rand(64, len(names), generator=torch.Generator().manual_seed(0)) < 0.5
    order = np.random.default_rng(0).permutation(len(names))
    shuffled = apply_attributes(x, present[:, order], [names[i] for i in order])
    assert torch.equal(apply_attributes(x, present, names), shuffled)
    one = apply_attributes(x[:1], torch.tensor([[True, True]]), ["invert", "frame"])
    assert one[0, 0, 0, 0] == 0  # the frame drawn first, then inverted


def test_task_family_invariants(pool):
    family = AttributeTasks(pool, TEST_ATTRIBUTES, K, Q, seed=3)
    batch, info = family.fixed_set(40, probes=M)
    assert batch.support_x.shape == (40, 2 * K, 1, 28, 28)
    assert batch.query_x.shape == (40, 2 * Q, 1, 28, 28)
    assert info["probe_x"].shape == (40, 3 * M, 1, 28, 28)
    for y, n in ((batch.support_y, K), (batch.query_y, Q)):
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.tensor([0] * n + [1] * n).expand(40, -1))  # balanced
    assert batch.support_x.dtype == torch.float32 and batch.support_x.max() <= 1
    present, index = info["present"], info["index"]
    # Each image is its base image with exactly the attributes the masks say.
    every = torch.cat([batch.support_x, batch.query_x, info["probe_x"]], 1)
    rendered = apply_attributes(
        as_float(pool[torch.from_numpy(index.reshape(-1))]),
        torch.from_numpy(present.reshape(-1, len(TEST_ATTRIBUTES))),
        TEST_ATTRIBUTES,
    )
    assert torch.equal(every.flatten(0, 1), rendered)
    distractors = []
    for t in range(40):
        triple, h = info["triple"][t], PAIRS[info["hypothesis"][t]]
        assert len(set(triple)) == 3
        carried = present[t][:, triple]  # (images, 3)
        support, query, probes = carried[: 2 * K], carried[2 * K : 2 * K + 2 * Q], carried[-3 * M :]
        assert not support[:K].any() and support[K:].all()  # negatives none, positives all three
        labels = query[:, list(h)].all(1)  # carries both attributes of h
        assert np.array_equal(labels, batch.query_y[t].numpy() == 1)  # query labels follow h
        for p, pair in enumerate(PAIRS):  # probes carry exactly one pair of the triple
            assert np.array_equal(
                probes[p * M : (p + 1) * M], np.tile(np.isin(range(3), pair), (M, 1))
            )
        others = np.setdiff1d(np.arange(len(TEST_ATTRIBUTES)), triple)
        distractors.append(present[t][:, others].mean())
    assert 0.15 < np.mean(distractors) < 0.45  # distractors at about 0.3, on every kind of image
    assert set(info["hypothesis"]) == {0, 1, 2}


def test_seeded_checkpointable_and_fixed_sets_are_prefixes(pool):
    a = AttributeTasks(pool, TEST_ATTRIBUTES, K, Q, seed=0)
    b = AttributeTasks(pool, TEST_ATTRIBUTES, K, Q, seed=0)
    first = a.sample_batch(3)
    assert all(torch.equal(u, v) for u, v in zip(first.tensors(), b.sample_batch(3).tensors()))
    state = a.state()
    second = a.sample_batch(2)
    b.set_state(state)
    assert all(torch.equal(u, v) for u, v in zip(second.tensors(), b.sample_batch(2).tensors()))
    other = AttributeTasks(pool, TEST_ATTRIBUTES, K, Q, seed=1).sample_batch(3)
    assert not torch.equal(first.support_x, other.support_x)

    long, info = a.fixed_set(8, probes=M)
    short, short_info = a.fixed_set(3)  # a prefix, and probes do not change the tasks
    tail, tail_info = a.fixed_set(5, probes=M, start=3)
    for whole, part, rest in zip(long.tensors(), short.tensors(), tail.tensors()):
        assert torch.equal(whole[:3], part) and torch.equal(whole[3:], rest)
    assert np.array_equal(info["triple"][:3], short_info["triple"])
    assert np.array_equal(info["hypothesis"][3:], tail_info["hypothesis"])
    assert torch.equal(info["probe_x"][3:], tail_info["probe_x"])
    a.sample_batch(4)  # fixed sets do not depend on the stream
    assert torch.equal(a.fixed_set(8)[0].query_x, long.query_x)


def test_bad_settings_are_one_line_config_errors(pool):
    bad = [
        dict(attributes=("shift", "blur", "nope")),
        dict(attributes=("shift", "blur")),
        dict(attributes=("shift", "blur", "blur")),
        dict(shots=0),
        dict(queries=0),
        dict(distractor=1.5),
        dict(images=pool[:, :, :20]),
    ]
    for changes in bad:
        settings = {**dict(images=pool, attributes=TEST_ATTRIBUTES, shots=K, queries=Q), **changes}
        with pytest.raises(ConfigError) as error:
            AttributeTasks(**settings)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="2-way"):
        MAML(MAML.recipe("ambiguous-attributes").updated(ways=5))
    with pytest.raises(ConfigError, match="image_size=84"):
        omniglot_attribute_tasks("test", K, Q, image_size=84)


def test_recipes(omniglot_root):
    config = MAML.recipe("ambiguous-attributes")
    assert (config.data, config.ways, config.shots, config.hidden, config.inner_steps) == (
        "attributes", 2, 5, 32, 1,
    )  # fmt: skip
    assert config.val_every == 0 and MAML.task_sampler(config, "val", omniglot_root) is None
    sampler = MAML.task_sampler(config, "train", omniglot_root)
    assert sampler.attributes == TRAIN_ATTRIBUTES and len(sampler.images) == 82240
    assert MAML(config).net(torch.zeros(3, 1, 28, 28)).shape == (3, 2)
    maml_fields = [f.name for f in fields(MAMLConfig) if f.name != "arithmetic"]
    for name, weight in (
        ("ambiguous-attributes", 0.05),
        ("ambiguous-attributes-kl015", 0.15),
        ("ambiguous-attributes-kl0005", 0.005),
    ):
        recipe = PLATIPUS.recipe(name)  # MAML's settings, and PLATIPUS's own
        assert all(getattr(recipe, f) == getattr(config, f) for f in maml_fields), name
        assert recipe.kl_weight == weight and recipe.eval_samples > 1


# -- the coverage metric on hand-built classifiers -------------------------------------------------
OVERLAYS = ("frame", "corner", "stripes", "dots")  # exactly detectable: pixels of ink 1


def detect(x: torch.Tensor) -> torch.Tensor:
    """Bool ``(N, 4)``: which of :data:`OVERLAYS` each image carries (every pixel of the
    pattern at 1, never all by chance on a real character)."""
    found = []
    for name in OVERLAYS:
        pattern = ATTRIBUTES[name](torch.zeros(1, 1, 28, 28))[0, 0] == 1
        found.append((x[:, 0][:, pattern] == 1).all(1))
    return torch.stack(found, 1)


class PairClassifiers(nn.Module):
    """Hand-built draws: the triple is what every support positive and no negative carries;
    draw d says "positive" iff the image carries pair ``pairs[d % len(pairs)]`` of it."""

    def __init__(self, pairs: tuple[int, ...]) -> None:
        super().__init__()
        self.pairs = pairs

    def sample_functions(self, support_x, support_y, query_x, samples, generator=None):
        s = detect(support_x)
        score = s[support_y == 1].float().mean(0) - s[support_y == 0].float().mean(0)
        triple = torch.sort(torch.argsort(score, descending=True, stable=True)[:3]).values
        carried = detect(query_x)[:, triple]
        draws = []
        for d in range(samples):
            pair = PAIRS[self.pairs[d % len(self.pairs)]]
            positive = carried[:, list(pair)].all(1).float()
            draws.append(torch.stack([-10 * positive, 10 * positive], 1))
        return torch.stack(draws)


class Constant(nn.Module):
    """Equal logits for every query: label 0 (argmax of a tie), probability 1/2 each."""

    def sample_functions(self, support_x, support_y, query_x, samples, generator=None):
        return torch.zeros(1, query_x.shape[0], 2)


class AnyTwo(nn.Module):
    """Positive iff the image carries two or more of the support's common attributes: labels
    every probe positive, so it is consistent with no pair."""

    def sample_functions(self, support_x, support_y, query_x, samples, generator=None):
        s = detect(support_x)
        common = s[support_y == 1].all(0) & ~s[support_y == 0].any(0)
        positive = (detect(query_x)[:, common].sum(1) >= 2).float()
        return torch.stack([-positive, positive], 1)[None]


def by_metric(results):
    return {r.protocol["metric"]: r for r in results}


def test_consistency_needs_a_majority_on_its_pair_and_a_minority_on_the_others():
    pair = torch.arange(3).repeat_interleave(2)  # 2 probes per pair
    labels = (
        torch.tensor(
            [
                [1, 1, 0, 0, 0, 0],  # pair 0 only: consistent with ab
                [1, 1, 1, 0, 0, 0],  # ac half positive: not a minority
                [1, 1, 1, 1, 0, 0],  # two pairs positive: neither
                [1, 0, 0, 0, 0, 0],  # half of ab: not a majority
                [0, 0, 0, 0, 1, 1],  # bc
            ]
        )
    ).float()
    draws = torch.stack([-labels, labels], -1)
    expected = [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert consistent_pairs(draws, pair).tolist() == [[bool(v) for v in r] for r in expected]


def test_coverage_of_hand_built_classifiers(pool):
    tasks, settings = 30, dict(attributes=OVERLAYS, shots=K, queries=Q, probes=M, seed=11)
    _, info = AttributeTasks(pool, OVERLAYS, K, Q, seed=11).fixed_set(tasks, probes=M)
    # Three draws, one per pair: every pair covered, the hidden one included.
    found = by_metric(
        evaluate_coverage(PairClassifiers((0, 1, 2)), pool, tasks=tasks, samples=3, **settings)
    )
    assert (found["coverage"].mean, found["coverage"].ci95) == (3.0, 0.0)
    assert found["covers_hidden"].mean == 1.0
    assert set(found) == set(METRICS) and found["coverage"].protocol["draws"] == 3
    # One draw (a point estimate): exactly one pair, the hidden one when it is pair 0; its
    # accuracy is that of "carries pair 0" on the query set, counted from the masks.
    found = by_metric(
        evaluate_coverage(PairClassifiers((0,)), pool, tasks=tasks, samples=1, **settings)
    )
    assert found["coverage"].mean == 1.0
    assert found["covers_hidden"].mean == pytest.approx(np.mean(info["hypothesis"] == 0))
    accuracy = []
    for t in range(tasks):
        query = info["present"][t][2 * K : 2 * K + 2 * Q][:, info["triple"][t]]
        predicted = query[:, list(PAIRS[0])].all(1)
        accuracy.append(np.mean(predicted == np.repeat([False, True], Q)))
    assert found["accuracy"].mean == pytest.approx(np.mean(accuracy))
    assert 0.5 < found["accuracy"].mean < 1
    # A constant: no pair, chance accuracy, NLL log 2.
    found = by_metric(evaluate_coverage(Constant(), pool, tasks=tasks, samples=5, **settings))
    assert found["coverage"].mean == 0 and found["accuracy"].mean == 0.5
    assert (
        found["nll"].mean == pytest.approx(np.log(2)) and found["coverage"].protocol["draws"] == 1
    )
    # "Two or more of the three": every probe positive, so no pair, though it beats chance.
    found = by_metric(evaluate_coverage(AnyTwo(), pool, tasks=tasks, samples=1, **settings))
    assert found["coverage"].mean == 0 and found["accuracy"].mean > 0.6
    assert found["coverage"].protocol["dataset"] == "omniglot-attributes (substitute for CelebA)"


# -- learning and PLATIPUS's draws -----------------------------------------------------------------
def test_maml_learns_the_ambiguous_attribute_tasks(tmp_path, omniglot_root, pool):
    from metalab.evaluate.run import evaluate_run

    config = MAML.recipe("ambiguous-attributes").updated(
        episodes=100, hidden=16, backend="vmap", channels_last="off", seed=0
    )
    train("maml", config, tmp_path, data_root=omniglot_root, progress=False)
    assert evaluate_run(tmp_path, episodes=200, data_root=omniglot_root) is None  # report ran
    stored = by_metric_rows(json.loads((tmp_path / "eval.json").read_text())["results"])
    accuracy = stored["accuracy"]
    assert accuracy["mean"] - accuracy["ci95"] > 0.5  # beats chance on the hidden pair (test)
    assert stored["coverage"]["protocol"]["draws"] == 1 and stored["coverage"]["mean"] <= 1
    # Adapting from a random init already beats chance (more attributes, more likely positive),
    # so also: meta-training helps on new tasks of the meta-train attributes (test images).
    trained, _ = load_method(tmp_path / "best.pt")
    torch.manual_seed(config.seed)  # the trainer's initialisation
    untrained = MAML(config)
    scores = [
        by_metric(evaluate_coverage(m, pool, TRAIN_ATTRIBUTES, tasks=200, samples=1))["accuracy"]
        for m in (untrained, trained)
    ]
    assert scores[1].mean > scores[0].mean + 0.02


def by_metric_rows(rows: list[dict]) -> dict[str, dict]:
    return {r["protocol"]["metric"]: r for r in rows}


def test_platipus_draws_give_coverage_through_metalab_eval(tmp_path, omniglot_root, pool):
    config = PLATIPUS.recipe("ambiguous-attributes").updated(
        episodes=5, hidden=8, eval_samples=6, backend="vmap", channels_last="off"
    )
    train("platipus", config, tmp_path, data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "best.pt")
    assert method.report(tmp_path, episodes=40, device="cpu", data_root=omniglot_root)
    stored = by_metric_rows(json.loads((tmp_path / "eval.json").read_text())["results"])
    assert set(stored) == set(METRICS)
    coverage = stored["coverage"]
    assert coverage["protocol"]["draws"] == 6 and coverage["protocol"]["tasks"] == 40
    assert 0 <= coverage["mean"] <= 3 and coverage["protocol"]["attributes"] == list(
        TEST_ATTRIBUTES
    )
    # The draws differ: PLATIPUS's prior gives several classifiers for one support set.
    batch, _ = AttributeTasks(pool, TEST_ATTRIBUTES, K, Q, seed=0).fixed_set(1)
    draws = method.sample_functions(
        batch.support_x[0],
        batch.support_y[0],
        batch.query_x[0],
        6,
        torch.Generator().manual_seed(0),
    )
    assert draws.shape == (6, 2 * Q, 2) and draws.std(0).mean() > 1e-4
