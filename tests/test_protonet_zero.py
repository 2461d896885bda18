"""Zero-shot ProtoNets and the CUB loader on a tiny generated CUB in the official layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalab.data import cub
from metalab.data.datasets import load_dataset
from metalab.errors import ConfigError, DataError
from metalab.evaluate import EVAL_SEED, evaluate
from metalab.evaluate.zero_shot import evaluate_zero_shot_all
from metalab.methods import get_method
from metalab.methods.protonet_zero import ProtoNetZero, ZeroShotSampler
from metalab.rundir import load_method
from metalab.train import train

PARTS = {"train": 8, "val": 4, "test": 4}  # classes per part of the fixture's split
PER_CLASS = 8
LATENT = 4  # attributes and features are both linear in a class's latent vector
FEATURE_DIM = 1024
# small kernels on a busy 2-core machine wait on a descheduled pool thread (conftest)
pytestmark = pytest.mark.usefixtures("one_thread")


def write_cub(root, crops: int = 1, seed: int = 0):
    """A CUB-200-2011 in miniature, in the official layout plus the Reed split and features.

    Class c has a latent z_c; its attributes are 50 + B z_c (within [0, 100] like the official
    percentages) and each image's features are relu(C z_c + 1) plus noise, so the class of an
    image is a noisy function of its class's attributes that transfers to unseen classes.
    The split files list classes shuffled, and images are listed in an interleaved class order."""
    rng = np.random.default_rng(seed)
    n_classes = sum(PARTS.values())
    names = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in range(n_classes)]
    latent = rng.normal(size=(n_classes, LATENT))
    attributes = np.clip(50 + 12 * latent @ rng.normal(size=(LATENT, cub.ATTRIBUTES)), 0, 100)
    image_class = np.tile(np.arange(n_classes), PER_CLASS)  # 0, 1, ..., 0, 1, ...
    mixing = rng.normal(size=(LATENT, FEATURE_DIM)) / np.sqrt(LATENT)
    clean = np.maximum(latent @ mixing + 1, 0)[image_class]  # (images, D)
    features = clean[:, None] + 0.3 * rng.normal(size=(len(image_class), crops, FEATURE_DIM))

    folder = root / cub.CUB_DIR
    (folder / "attributes").mkdir(parents=True)
    (root / "cub/splits/reed").mkdir(parents=True)
    (root / "cub/features").mkdir(parents=True)
    (root / cub.CLASSES).write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(names)))
    (root / cub.IMAGES).write_text(
        "".join(
            f"{i + 1} {names[c]}/{names[c][4:]}_{i:04d}_{i}.jpg\n"
            for i, c in enumerate(image_class)
        )
    )
    (root / cub.IMAGE_LABELS).write_text(
        "".join(f"{i + 1} {c + 1}\n" for i, c in enumerate(image_class))
    )
    np.savetxt(root / cub.CLASS_ATTRIBUTES, attributes, fmt="%.10f")
    order = rng.permutation(n_classes)
    start = 0
    for part, count in PARTS.items():
        listed = order[start : start + count]
        start += count
        (root / cub.SPLIT_FILES[part]).write_text("".join(f"{names[c]}\n" for c in listed))
    np.save(root / cub.FEATURES, (features[:, 0] if crops == 1 else features).astype(np.float32))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path):
    return write_cub(tmp_path / "data")


def _split_names(root, part):
    return (root / cub.SPLIT_FILES[part]).read_text().split()


# -- the loader ------------------------------------------------------------------------------


def test_reads_the_official_layout(root):
    attributes = np.loadtxt(root / cub.CLASS_ATTRIBUTES, dtype=np.float32)
    features = np.load(root / cub.FEATURES)
    all_names = [line.split()[1] for line in (root / cub.CLASSES).read_text().splitlines()]
    seen = set()
    for part, count in PARTS.items():
        data = load_dataset("cub", "reed", part, root=root)
        assert isinstance(data, cub.AttributeDataset) and data.name == f"cub/reed/{part}"
        assert data.class_names == sorted(_split_names(root, part))  # sorted = class id order
        assert data.num_classes == count and (data.counts == PER_CLASS).all()
        assert data.features.shape == (count * PER_CLASS, 1, FEATURE_DIM)
        assert data.features.dtype == torch.float32 and not data.random_crop
        assert data.attributes.shape == (count, cub.ATTRIBUTES)
        ids = [all_names.index(n) for n in data.class_names]
        assert torch.equal(data.attributes, torch.from_numpy(attributes[ids]))
        # each example's features are the row of images.txt of an image of its class
        first = data.class_index[:, 0]  # the first image of each class
        rows = [i for i in range(len(features)) if i % len(all_names) in ids][: len(ids)]
        assert np.array_equal(data.features[first, 0].numpy(), features[rows])
        assert not seen & set(data.class_names)
        seen |= set(data.class_names)
    trainval = load_dataset("cub", "reed", "trainval", root=root)
    assert set(trainval.class_names) == set(_split_names(root, "train") + _split_names(root, "val"))


def test_features_go_through_unchanged(root):
    data = cub.load_cub(root, "reed", "test")
    views = np.array([5, 0, 17])
    assert torch.equal(data.gather(views), data.features[views, 0])


def test_ten_crops_train_on_random_crops_and_test_on_the_middle_one(tmp_path):
    root = write_cub(tmp_path / "data", crops=10)
    train_set, test_set = (cub.load_cub(root, "reed", part) for part in ("train", "test"))
    assert train_set.features.shape[1:] == (10, FEATURE_DIM)
    assert train_set.random_crop and not test_set.random_crop
    crops = ZeroShotSampler(train_set, 8, 5, seed=0).sample_indices() % 10
    assert len(np.unique(crops)) > 1
    assert (ZeroShotSampler(test_set, 4, 5, seed=0).fixed_indices(3) % 10 == 0).all()


def _first_line_nan(root):
    good = (root / cub.CLASS_ATTRIBUTES).read_text().splitlines()
    return "\n".join([" ".join(["nan"] * cub.ATTRIBUTES)] + good[1:]) + "\n"


_ROWS_OF_50 = "\n".join(" ".join(["50"] * cub.ATTRIBUTES) for _ in range(3))
# (file, its new content given the data root; None deletes it)
CORRUPT = {
    "missing-classes": (cub.CLASSES, lambda root: None),
    "missing-images": (cub.IMAGES, lambda root: None),
    "missing-labels": (cub.IMAGE_LABELS, lambda root: None),
    "missing-attributes": (cub.CLASS_ATTRIBUTES, lambda root: None),
    "missing-trainclasses": (cub.SPLIT_FILES["train"], lambda root: None),
    "missing-valclasses": (cub.SPLIT_FILES["val"], lambda root: None),
    "missing-testclasses": (cub.SPLIT_FILES["test"], lambda root: None),
    "missing-features": (cub.FEATURES, lambda root: None),
    "classes-ids": (cub.CLASSES, lambda root: "1 001.A\n3 003.C\n"),
    "images-count": (cub.IMAGES, lambda root: "1 a.jpg\n2 b.jpg\n"),
    "labels-unknown-class": (cub.IMAGE_LABELS, lambda root: "1 1\n2 99\n"),
    "attributes-rows": (cub.CLASS_ATTRIBUTES, lambda root: _ROWS_OF_50),
    "attributes-columns": (cub.CLASS_ATTRIBUTES, lambda root: "1 2 3\n" * 16),
    "attributes-nan": (cub.CLASS_ATTRIBUTES, _first_line_nan),
    "split-unknown-class": (cub.SPLIT_FILES["test"], lambda root: "201.Not_a_bird\n"),
    "split-overlap": (cub.SPLIT_FILES["val"], lambda root: _split_names(root, "train")[0]),
    "split-format": (cub.SPLIT_FILES["val"], lambda root: "1 001.Bird_A\n"),
    "features-unreadable": (cub.FEATURES, lambda root: "not an array"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_missing_or_corrupt_file_is_a_one_line_data_error_naming_it(root, case):
    relative, make = CORRUPT[case]
    content = make(root)
    if content is None:
        (root / relative).unlink()
    else:
        (root / relative).write_text(content)
    with pytest.raises(DataError) as info:
        cub.load_cub(root, "reed", "test")
    message = str(info.value)
    assert "\n" not in message and str(root / relative) in message
    assert content is not None or message.startswith("missing")


@pytest.mark.parametrize(
    "shape, values",
    [((16 * PER_CLASS - 1, FEATURE_DIM), 0.0), ((16 * PER_CLASS, FEATURE_DIM), np.nan)],
    ids=["features-rows", "features-nan"],
)
def test_bad_features_are_a_one_line_data_error(root, shape, values):
    np.save(root / cub.FEATURES, np.full(shape, values, dtype=np.float32))
    with pytest.raises(DataError, match="googlenet-1024.npy") as info:
        cub.load_cub(root, "reed", "train")
    assert "\n" not in str(info.value)


def test_unknown_split_or_part(root):
    with pytest.raises(ConfigError, match="reed"):
        load_dataset("cub", "vinyals", "train", root=root)
    with pytest.raises(ConfigError, match="trainval"):
        load_dataset("cub", "reed", "all", root=root)


# -- the method's mechanics ----------------------------------------------------------------


def test_prototypes_have_unit_norm():
    method = ProtoNetZero(ProtoNetZero.Config())
    attributes = 100 * torch.rand(50, cub.ATTRIBUTES)
    norms = method.prototypes(attributes).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(50), atol=1e-5)


def test_episodes_have_the_zero_shot_invariants(root):
    data = cub.load_cub(root, "reed", "train")
    sampler = get_method("protonet-zero").sampler(data, 5, 0, 3, seed=1)
    for _ in range(5):
        indices = sampler.sample_indices()
        episode = sampler.episode_from_indices(indices)
        classes = data.labels[indices]  # (ways, queries): one class per row
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 5
        assert set(classes[:, 0]) <= set(range(data.num_classes))
        assert episode.support_x.shape == (5, cub.ATTRIBUTES)
        assert torch.equal(episode.support_x, data.attributes[classes[:, 0]])
        assert torch.equal(episode.support_y, torch.arange(5))
        assert episode.query_x.shape == (15, FEATURE_DIM)
        assert torch.equal(episode.query_y, torch.arange(5).repeat_interleave(3))
        assert torch.equal(episode.query_x, data.features[indices.reshape(-1), 0])
    batch = sampler.sample_batch(2)
    assert batch.support_x.shape == (2, 5, cub.ATTRIBUTES) and batch.query_y.shape == (2, 15)


def test_fixed_episodes_are_reproducible_and_the_stream_resumes(root):
    data = cub.load_cub(root, "reed", "test")
    first = ZeroShotSampler(data, 4, 5, seed=EVAL_SEED).fixed_indices(6)
    again = ZeroShotSampler(data, 4, 5, seed=EVAL_SEED).fixed_indices(4)
    assert np.array_equal(first[:4], again)
    other = ZeroShotSampler(data, 4, 5, seed=EVAL_SEED + 1).fixed_indices(6)
    assert not np.array_equal(first, other)
    stream = ZeroShotSampler(data, 3, 2, seed=3)
    stream.sample()
    state = stream.state()
    expected = stream.sample_indices()
    stream.set_state(state)
    assert np.array_equal(stream.sample_indices(), expected)
    assert stream.protocol()["shots"] == 0


def test_sampler_rejects_shots_and_images(root):
    data = cub.load_cub(root, "reed", "train")
    with pytest.raises(ConfigError, match="--shots 0"):
        ProtoNetZero.sampler(data, 5, 1, 3)
    with pytest.raises(ConfigError, match="ways=9"):
        ProtoNetZero.sampler(data, 9, 0, 3)
    with pytest.raises(ConfigError, match="--queries"):
        ProtoNetZero.sampler(data, 5, 0, PER_CLASS + 1)


def test_predict_follows_support_labels():
    torch.manual_seed(0)
    method = ProtoNetZero(ProtoNetZero.Config()).eval()
    attributes, features = 100 * torch.rand(4, cub.ATTRIBUTES), torch.rand(6, FEATURE_DIM)
    logits = method.predict(attributes, torch.arange(4), features)
    permuted = method.predict(attributes[[2, 0, 3, 1]], torch.tensor([2, 0, 3, 1]), features)
    assert logits.shape == (6, 4) and torch.allclose(logits, permuted)


def test_optimizer_is_the_papers():
    method = ProtoNetZero(ProtoNetZero.recipe("cub"))
    group = method.make_optimizer().param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 1e-5)


# -- learning --------------------------------------------------------------------------------


def test_learns_to_classify_unseen_classes(root, tmp_path):
    config = ProtoNetZero.recipe("cub").updated(
        ways=8, queries=5, eval_ways=4, eval_queries=5, episodes=200, val_every=100, val_episodes=20
    )
    train("protonet-zero", config, tmp_path / "run", data_root=root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt", "protonet-zero")
    test_set = cub.load_cub(root, "reed", "test")
    episodes = evaluate(method, ZeroShotSampler(test_set, 4, 5, seed=EVAL_SEED), 50)
    everything = evaluate_zero_shot_all(method, test_set)
    chance = 1 / PARTS["test"]
    assert episodes.mean > chance + 0.4, episodes
    assert everything.mean > chance + 0.4, everything
    assert everything.protocol["images"] == PARTS["test"] * PER_CLASS


def test_cli_trains_and_evaluates_zero_shot(root, tmp_path):
    """`metalab train protonet-zero` then `metalab eval`: by default its own protocol — fixed
    zero-shot episodes of all the test classes, and every test image among them."""
    from metalab.cli import main

    run = tmp_path / "run"
    common = ["--data-root", str(root), "--no-progress", "--device", "cpu"]
    assert main(["train", "protonet-zero", "--recipe", "cub", "--ways", "8", "--queries", "5",
                 "--eval-ways", "4", "--episodes", "20", "--val-every", "0", "--run-dir", str(run),
                 *common]) == 0  # fmt: skip
    assert main(["eval", str(run), "--episodes", "10", "--queries", "5", *common]) == 0
    results = json.loads((run / "eval.json").read_text())["results"]
    assert [(r["protocol"]["ways"], r["protocol"]["shots"]) for r in results] == [
        (PARTS["test"], 0),
        (PARTS["test"], 0),
    ]
    assert results[0]["protocol"]["episodes"] == 10
    assert results[1]["protocol"]["queries"] == "all images"
