"""What the unsupervised embeddings share: unlabelled minibatches (tasks.images) and embedding a
dataset with a trained run, cached (methods.embedding.embeddings_of)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

import metalab.rundir
from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.methods import get_method
from metalab.methods.embedding import embeddings_of
from metalab.rundir import save_checkpoint
from metalab.tasks.images import ImageBatches


def distinct_images(n: int, size: int = 28) -> FewShotDataset:
    """``n`` images, image i with value i % 255 + 1 at pixel i % size², all of one class."""
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x.view(n, -1)[torch.arange(n), torch.arange(n) % (size * size)] = (
        torch.arange(n) % 255 + 1
    ).to(torch.uint8)
    return FewShotDataset(x, np.zeros(n, dtype=np.int64), ["all"], "distinct")


def test_image_batches_are_distinct_seeded_and_resumable():
    data = distinct_images(300)
    stream = ImageBatches(data, batch=50, seed=3)
    first = stream.sample().x.flatten(1)
    assert first.shape == (50, 28 * 28) and len(torch.unique(first, dim=0)) == 50
    state = stream.state()
    ahead = [stream.sample().x for _ in range(3)]
    stream.set_state(state)
    for expected in ahead:
        assert torch.equal(stream.sample().x, expected)
    again = ImageBatches(data, batch=50, seed=3)
    assert torch.equal(again.sample().x.flatten(1), first)
    two = stream.sample_batch(2).x
    assert two.shape == (100, 1, 28, 28)
    assert torch.equal(stream.fixed(40).x, stream.fixed(100).x[:40])  # a prefix, not the stream
    with pytest.raises(ConfigError, match="batch=301"):
        ImageBatches(data, batch=301)


def _run(tmp_path, method_name: str, seed: int, **changes):
    """A run directory holding an untrained ``method_name`` as best.pt."""
    cls = get_method(method_name)
    config = cls.Config(**changes)
    torch.manual_seed(seed)
    method = cls(config)
    run = tmp_path / f"{method_name}-{seed}"
    run.mkdir(exist_ok=True)
    save_checkpoint(
        {
            "method": method_name,
            "config": asdict(config),
            "model": method.state_dict(),
            "episode": 0,
        },
        run / "best.pt",
    )
    return run, method


def test_embeddings_are_cached_per_checkpoint(tmp_path, monkeypatch):
    data = distinct_images(64)
    run, method = _run(tmp_path, "acai", 0, bf16="off", channels_last="off")
    z = embeddings_of(run, data)
    assert z.shape == (64, method.embedding_dim) and z.dtype == np.float32
    method.eval()
    with torch.no_grad():
        np.testing.assert_allclose(z, method.encode(data.gather(np.arange(64))).numpy(), atol=1e-6)
    assert len(list(run.glob("embeddings-*.npy"))) == 1

    def no_loading(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(metalab.rundir, "load_method", no_loading)
    np.testing.assert_array_equal(embeddings_of(run, data), z)
    monkeypatch.undo()
    # Other weights in best.pt (the run trained further): embedded again, under another key.
    other, _ = _run(tmp_path, "acai", 1, bf16="off", channels_last="off")
    (run / "best.pt").write_bytes((other / "best.pt").read_bytes())
    assert not np.allclose(embeddings_of(run, data), z)
    assert len(list(run.glob("embeddings-*.npy"))) == 2


def test_embeddings_need_an_embedding_run(tmp_path):
    data = distinct_images(8)
    with pytest.raises(ConfigError, match="not found"):
        embeddings_of(tmp_path / "nothing", data)
    run, _ = _run(tmp_path, "protonet", 0)
    with pytest.raises(ConfigError, match="not an embedding"):
        embeddings_of(run, data)
