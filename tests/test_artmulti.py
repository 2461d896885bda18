"""Omni-Art-Multi on the real Omniglot archives: 12 sub-datasets, disjoint groups and class
splits, filters, episodes from one sub-dataset, per-sub-dataset evaluation, and learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalab.data.artmulti import (
    FILTERS,
    GROUPS,
    alphabet_groups,
    apply_filter,
    character_parts,
    omni_art_multi,
    sub_dataset_names,
)
from metalab.data.datasets import load_dataset
from metalab.data.fewshot import FewShotDataset
from metalab.data.omniglot import load_archive
from metalab.errors import ConfigError
from metalab.evaluate.multi import SubDatasetTable, mean_of, sub_dataset_tables
from metalab.evaluate.protocol import Result
from metalab.evaluate.run import evaluate_run
from metalab.methods.maml import MAML
from metalab.methods.protonet import ProtoNet
from metalab.reports import show_evaluation
from metalab.tasks.episodes import EpisodeSampler
from metalab.train import train


@pytest.fixture(scope="module")
def parts(omniglot_root) -> dict[str, FewShotDataset]:
    """The train, val and test parts, loaded once for the file."""
    return {p: omni_art_multi("art4", p, omniglot_root) for p in ("train", "val", "test")}


@pytest.fixture(scope="module")
def characters(omniglot_root) -> list[str]:
    return [
        n for which in ("background", "evaluation") for n in load_archive(which, omniglot_root)[1]
    ]


def character(class_name: str) -> str:
    """``"Alphabet/characterNN/blur"`` -> ``"Alphabet/characterNN"``."""
    return class_name.rsplit("/", 1)[0]


@pytest.mark.realdata
def test_alphabet_groups_are_disjoint_covering_and_balanced(characters):
    groups = alphabet_groups(characters)
    alphabets = {c.split("/")[0] for c in characters}
    assert len(groups) == GROUPS and len(alphabets) == 50
    assert sorted(a for g in groups for a in g) == sorted(alphabets)  # each alphabet exactly once
    sizes = [sum(c.split("/")[0] in g for c in characters) for g in groups]
    assert sum(sizes) == 1623 and max(sizes) - min(sizes) <= 15, sizes  # 412/411/400/400


@pytest.mark.realdata
def test_twelve_sub_datasets_and_disjoint_class_splits(parts, characters):
    assert sub_dataset_names()[:5] == ["g1/original", "g2/original", "g3/original", "g4/original",
                                       "g1/blur"]  # fmt: skip
    groups = alphabet_groups(characters)
    seen: dict[str, set[str]] = {}
    for part, data in parts.items():
        assert data.group_names == sub_dataset_names() and len(data.group_names) == 12
        assert sorted(np.unique(data.groups)) == list(range(12))
        names = np.array(data.class_names)
        for sub in range(12):
            f, g = divmod(sub, GROUPS)
            members = names[data.groups == sub]
            assert all(n.endswith("/" + FILTERS[f]) for n in members)
            assert all(n.split("/")[0] in groups[g] for n in members)
            # the three filters of a group hold the same characters, in the same order
            originals = [character(n) for n in names[data.groups == g]]
            assert [character(n) for n in members] == originals
        seen[part] = {character(n) for n in names}
    assert not (
        seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"]
    )
    assert len(seen["train"] | seen["val"] | seen["test"]) == 1623  # every character in one part
    # the split is fixed: recomputing it gives the same test characters
    members = [c for c in characters if c.split("/")[0] in groups[2]]
    again = {n for n in character_parts(members, 2)["test"]}
    assert again == {
        character(n) for n, s in zip(parts["test"].class_names, parts["test"].groups) if s == 2
    }


@pytest.mark.realdata
def test_filters_change_pixels_but_keep_the_characters(parts):
    data = parts["test"]
    images = data.images.numpy()[:, 0]
    for g in range(GROUPS):
        original = images[data.class_index[np.flatnonzero(data.groups == g)]]  # (classes, 20, S, S)
        for f, name in enumerate(FILTERS[1:], start=1):
            filtered = images[data.class_index[np.flatnonzero(data.groups == f * GROUPS + g)]]
            # the same drawings under the filter, exactly
            assert np.array_equal(filtered, apply_filter(name, original))
            assert np.abs(filtered.astype(float) - original).mean() > 5  # pixels do change
            # and still recognisable: each filtered first drawing is most correlated with its own
            # character's first drawing among the group's test characters (chance: 1 in ~80)
            a, b = (unit(x[:, 0]) for x in (filtered, original))
            identified = ((a @ b.T).argmax(1) == np.arange(len(a))).mean()
            assert identified > (0.95 if name == "blur" else 0.6), (g, name, identified)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.realdata
def test_every_episode_comes_from_one_sub_dataset(parts):
    data = parts["train"]
    sampler = EpisodeSampler(data, 5, 1, 15, seed=0)
    drawn = []
    for _ in range(120):
        batch = np.stack([sampler.sample_indices() for _ in range(4)])  # a meta-batch of 4 tasks
        for task in batch:
            subs = set(data.groups[data.labels[task.reshape(-1)]])
            assert len(subs) == 1  # support and query, every class: one sub-dataset
            drawn.append(subs.pop())
    counts = np.bincount(drawn, minlength=12)
    assert counts.min() > 15, counts  # all 12 drawn, about uniformly (40 expected each)
    for episode in sampler.fixed_indices(50):  # fixed (test and validation) episodes too
        assert len(set(data.groups[data.labels[episode.reshape(-1)]])) == 1
    # reproducible and checkpointable
    state = sampler.state()
    expected = [sampler.sample_indices() for _ in range(3)]
    other = EpisodeSampler(data, 5, 1, 15, seed=99)
    other.set_state(state)
    assert all(np.array_equal(other.sample_indices(), e) for e in expected)
    assert np.array_equal(EpisodeSampler(data, 5, 1, 15, seed=0).sample_indices(),
                          EpisodeSampler(data, 5, 1, 15, seed=0).sample_indices())  # fmt: skip


def test_sub_datasets_on_small_arrays():
    images = np.zeros((6, 4, 2, 2), dtype=np.uint8)
    groups = np.array([0, 0, 0, 1, 1, 2])
    data = FewShotDataset.from_class_array(
        images, [f"c{i}" for i in range(6)], "toy", groups=groups, group_names=["a", "b", "c"]
    )
    sampler = EpisodeSampler(data, 2, 1, 1, seed=0)
    seen = {frozenset(data.labels[sampler.sample_indices()[:, 0]]) for _ in range(200)}
    # "c" has one class, too few for a 2-way episode: never drawn; the others both are
    assert seen == {frozenset(p) for p in ([0, 1], [0, 2], [1, 2], [3, 4])}
    plain = FewShotDataset.from_class_array(images, data.class_names, "toy")
    assert data.fingerprint() != plain.fingerprint()  # grouped episodes get their own cache file
    part = data.subset(np.array([4, 0]), "part")
    assert part.groups.tolist() == [1, 0] and part.group_names == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="no sub-dataset of toy has that many"):
        EpisodeSampler(data, 4, 1, 1)
    with pytest.raises(ConfigError, match="groups must give each of the 6 classes"):
        FewShotDataset.from_class_array(images, data.class_names, "toy", groups=groups[:5],
                                        group_names=["a", "b", "c"])  # fmt: skip


def test_unknown_split_or_part_names_the_choice():
    with pytest.raises(ConfigError, match="split 'vinyals': use art4"):
        load_dataset("omni-art-multi", "vinyals", "train")
    with pytest.raises(ConfigError, match="unknown part 'dev'"):
        load_dataset("omni-art-multi", "art4", "dev")


def test_per_filter_means_are_the_means_of_their_cells():
    rng = np.random.default_rng(0)
    results = [
        Result(float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.01, 0.03)),
               {"dataset": f"omni-art-multi/art4/test/{name}", "ways": 5, "shots": 1,
                "sub_dataset": name, "group": name.split("/")[0], "filter": name.split("/")[1]})
        for name in sub_dataset_names()
    ]  # fmt: skip
    (table,) = sub_dataset_tables(results)
    assert (
        isinstance(table, SubDatasetTable)
        and table.protocol["dataset"] == "omni-art-multi/art4/test"
    )
    assert table.rows == ["g1", "g2", "g3", "g4"] and table.columns == list(FILTERS)
    for f, column in enumerate(FILTERS):
        cells = results[f * GROUPS : (f + 1) * GROUPS]
        mean, ci = table.column_means()[column]
        assert mean == pytest.approx(np.mean([r.mean for r in cells]))
        assert ci == pytest.approx(np.sqrt(np.sum([r.ci95**2 for r in cells])) / 4)
    for g, row in enumerate(table.rows):
        assert table.row_means()[row][0] == pytest.approx(np.mean([r.mean for r in results[g::4]]))
    assert table.overall()[0] == pytest.approx(np.mean([r.mean for r in results]))
    assert mean_of(results[:1]) == (results[0].mean, results[0].ci95)


@pytest.mark.realdata
def test_protonet_learns_and_eval_reports_every_sub_dataset(omniglot_root, tmp_path, capsys):
    config = ProtoNet.recipe("omni-art-multi-5w1s").updated(
        queries=5, episodes=200, val_every=0, bf16="off", channels_last="off"
    )
    torch.manual_seed(0)
    train("protonet", config, tmp_path, data_root=omniglot_root, progress=False)
    evaluation = evaluate_run(tmp_path, queries=10, episodes=20, data_root=omniglot_root)
    assert len(evaluation.results) == 12  # the run's own 5-way 1-shot, per sub-dataset
    show_evaluation(evaluation)
    assert "per sub-dataset" in capsys.readouterr().out
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert {r["protocol"]["sub_dataset"] for r in stored["results"]} == set(sub_dataset_names())
    assert all(r["protocol"]["episodes"] == 20 for r in stored["results"])
    per_filter = stored["sub_datasets"]["5-way 1-shot"]["per_filter"]
    for name in FILTERS:  # chance is 20%
        assert per_filter[name]["mean"] > 0.5, per_filter


@pytest.mark.realdata
def test_maml_recipe_answers_omni_art_multi_episodes(parts):
    config = MAML.recipe("omni-art-multi-5w1s").updated(eval_inner_steps=1)
    method = MAML(config)
    episode = EpisodeSampler(parts["test"], 5, 1, 15, seed=0).sample()
    assert method.predict(episode.support_x, episode.support_y, episode.query_x).shape == (75, 5)
    assert (config.hidden, config.pool, config.inner_steps, config.inner_lr, config.meta_batch) == (
        32,
        "max",
        5,
        0.01,
        4,
    )
