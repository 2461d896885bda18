"""miniImageNet loader on a tiny fixture in the Ravi & Larochelle layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from metalab.data.miniimagenet import load_miniimagenet
from metalab.errors import ConfigError, DataError

CLASSES = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244", "n02114548"],
    "test": ["n01930112", "n01981276", "n02099601"],
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path):
    """3 classes per split, 4 images per class, in sizes and modes the real images come in."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    for split, classes in CLASSES.items():
        lines = ["filename,label"]
        # Listed in reverse class order: labels must follow sorted class names, not CSV order.
        for wnid in reversed(classes):
            for i in range(4):
                name = f"{wnid}{i:08d}.jpg" if i % 2 else f"{wnid}{i:08d}.png"
                pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
                img = Image.fromarray(pixels)
                (img.convert("L") if i == 3 else img).save(folder / "images" / name)
                lines.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def test_shapes_labels_and_class_names(root):
    images, labels, names = load_miniimagenet(root, "val", size=16)
    assert images.shape == (12, 3, 16, 16) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert names == CLASSES["val"]
    assert labels.tolist() == [2] * 4 + [1] * 4 + [0] * 4
    gray = images[3]  # the grayscale PNG becomes three equal channels
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()


def test_second_load_comes_from_the_cache(root, tmp_path):
    first = load_miniimagenet(root, "train", size=8)
    cached = list((tmp_path / "cache").glob("miniimagenet-train-8-*.npz"))
    assert len(cached) == 1
    # Overwrite a class's images, keeping size and mtime: a cache hit must not decode them.
    for path in (root / "miniimagenet/images").glob("n01532829*"):
        stat = path.stat()
        path.write_bytes(b"x" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_miniimagenet(root, "train", size=8)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_changed_csv_rebuilds_and_replaces_the_cache(root, tmp_path):
    load_miniimagenet(root, "test", size=8)
    csv = root / "miniimagenet/test.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:5]) + "\n")  # one class only
    images, labels, names = load_miniimagenet(root, "test", size=8)
    assert len(images) == 4 and names == [CLASSES["test"][2]] and set(labels.tolist()) == {0}
    assert len(list((tmp_path / "cache").glob("miniimagenet-test-8-*.npz"))) == 1


def test_missing_folder_explains_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_miniimagenet(tmp_path, "train")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "miniimagenet") in message
    assert "jakesnell/prototypical-networks" in message and "ImageNet" in message


def test_missing_image_is_named(root):
    (root / "miniimagenet/images/n0185567200000002.png").unlink()
    with pytest.raises(DataError, match="n0185567200000002.png"):
        load_miniimagenet(root, "val", size=8)


def test_unreadable_image_is_named(root):
    (root / "miniimagenet/images/n0185567200000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="n0185567200000001.jpg"):
        load_miniimagenet(root, "val", size=8)


def test_bad_csv_header(root):
    (root / "miniimagenet/val.csv").write_text("image,class\na.jpg,n1\n")
    with pytest.raises(DataError, match="filename,label"):
        load_miniimagenet(root, "val", size=8)


def test_unknown_split(root):
    with pytest.raises(ConfigError, match="train, val, test"):
        load_miniimagenet(root, "trainval")


@pytest.mark.parametrize("method", ["maml", "llama", "platipus"])
def test_the_miniimagenet_recipes_train_and_answer_on_a_copy_in_the_official_layout(
    method, root, tmp_path
):
    """MAML's, LLAMA's and PLATIPUS's miniimagenet-5w1s recipes (84x84 RGB, 32 filters with
    max-pool, 5 inner steps) take a meta-step on the fixture, with the ways, queries and batch
    shrunk to its 3 classes of 4 images, and answer an episode of its test part."""
    import torch

    from metalab.data.datasets import load_dataset
    from metalab.methods import get_method
    from metalab.rundir import load_method
    from metalab.tasks.episodes import EpisodeSampler
    from metalab.train import train

    cls = get_method(method)
    config = cls.recipe("miniimagenet-5w1s").updated(
        ways=3, eval_ways=3, queries=1, eval_queries=1, meta_batch=1, episodes=1, val_every=0,
        backend="loop", channels_last="off",  # no speed probe: one step is the test
    )  # fmt: skip
    assert (config.image_size, config.hidden, config.pool, config.inner_steps) == (84, 32, "max", 5)
    train(method, config, tmp_path / method, data_root=root, progress=False)
    model, saved = load_method(tmp_path / method / "checkpoint.pt")
    assert saved["episode"] == 1
    test = load_dataset("miniimagenet", "ravi", "test", 84, root)
    episode = EpisodeSampler(test, 3, 1, 1, seed=0).sample()
    assert episode.support_x.shape == (3, 3, 84, 84)
    with torch.no_grad():
        logits = model.predict(episode.support_x, episode.support_y, episode.query_x)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
