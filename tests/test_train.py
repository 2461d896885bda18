"""Training on real Omniglot: learning, exact resume, atomic checkpoints, NaN handling."""

from __future__ import annotations

import json

import pytest
import torch

from metalab.data.omniglot import omniglot
from metalab.errors import CheckpointError, ConfigError, TrainingError
from metalab.evaluate import evaluate
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.rundir import load_checkpoint, load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.train import train

TINY = ProtoNetConfig(
    split="lake",
    ways=5,
    shots=1,
    queries=5,
    eval_ways=5,
    eval_shots=1,
    episodes=12,
    lr_decay_every=5,
    val_every=4,
    val_episodes=5,
    hidden=16,
    bf16="off",  # fixed arithmetic: two runs compared bit for bit must not probe (and differ)
    channels_last="off",
)


@pytest.mark.realdata
def test_protonet_learns_omniglot_quickly(omniglot_root, tmp_path):
    config = ProtoNetConfig(
        ways=20, shots=1, queries=5, episodes=150, val_every=0, bf16="auto", channels_last="auto"
    )
    torch.manual_seed(0)
    train("protonet", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    test = omniglot("vinyals", "test", omniglot_root)
    result = evaluate(method, EpisodeSampler(test, 5, 1, 15, seed=7), episodes=100)
    assert result.mean > 0.80, result  # chance is 0.20


@pytest.mark.realdata
def test_resume_gives_the_same_weights(omniglot_root, tmp_path):
    train("protonet", TINY, tmp_path / "straight", data_root=omniglot_root, progress=False)
    half = TINY.updated(episodes=6)
    train("protonet", half, tmp_path / "resumed", data_root=omniglot_root, progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["episode"] == 6
    train(
        "protonet", TINY, tmp_path / "resumed", resume=True, data_root=omniglot_root, progress=False
    )
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["episode"] == b["episode"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["sampler"] == b["sampler"] and a["best_val"] == b["best_val"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    # Stopping at 6, off the validation grid, validated the last weights and logged it.
    assert [r["episode"] for r in rows if r["kind"] == "val"] == [4, 6, 8, 12]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "best.pt",
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "tb",
    ]


@pytest.mark.realdata
def test_existing_run_needs_resume(omniglot_root, tmp_path):
    train(
        "protonet",
        TINY.updated(episodes=2, val_every=0),
        tmp_path,
        data_root=omniglot_root,
        progress=False,
    )
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        train("protonet", TINY, tmp_path, data_root=omniglot_root, progress=False)


@pytest.mark.realdata
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(omniglot_root, tmp_path):
    config = TINY.updated(lr=1e30, episodes=40, val_every=1)
    with pytest.raises(
        TrainingError, match=r"loss became nan at episode (\d+); the last good"
    ) as err:
        train("protonet", config, tmp_path, data_root=omniglot_root, progress=False)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    bad_episode = int(err.value.args[0].split("episode ")[1].split(";")[0])
    assert checkpoint["episode"] == bad_episode - 1
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )


def test_checkpoint_errors(tmp_path):
    torch.save({"method": "protonet", "config": {}, "model": {}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="is a 'protonet' checkpoint, not 'maml'"):
        load_checkpoint(tmp_path / "a.pt", "maml")
    (tmp_path / "b.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "c.pt")
    torch.save(
        {"method": "protonet", "config": {"hidden": 8}, "model": ProtoNet(TINY).state_dict()},
        tmp_path / "d.pt",
    )
    with pytest.raises(CheckpointError, match="does not fit protonet with its saved config"):
        load_method(tmp_path / "d.pt")


def test_the_trainer_trains_on_train_or_trainval_only(tmp_path):
    for part in ("val", "test"):
        with pytest.raises(ConfigError, match=f"train_part='{part}': train on train or trainval"):
            train("protonet", TINY.updated(train_part=part), tmp_path / part, progress=False)


def test_a_run_without_validation_checkpoints_on_the_way_and_resumes_after_a_crash(
    tmp_path, monkeypatch
):
    """MAML on sinusoids validates never; with checkpoints due every step, a process that dies at
    its 4th meta-step leaves a checkpoint of episode 3, and resuming it to 5 gives the weights of
    5 straight episodes, bit for bit."""
    import metalab.train
    from metalab.methods.maml import MAML

    config = MAML.recipe("sinusoid").updated(episodes=5, meta_batch=3, hidden=8, backend="vmap")
    train("maml", config, tmp_path / "straight", progress=False)
    monkeypatch.setattr(metalab.train, "CHECKPOINT_SECONDS", 0)
    step, calls = MAML.meta_step, []

    def dies_at_the_fourth(self, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the process died")
        return step(self, batch)

    monkeypatch.setattr(MAML, "meta_step", dies_at_the_fourth)
    with pytest.raises(RuntimeError, match="died"):
        train("maml", config, tmp_path / "crashed", progress=False)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["episode"] == 3
    monkeypatch.setattr(MAML, "meta_step", step)
    train("maml", config, tmp_path / "crashed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["model"]
    for key in (k for k in a if k != "_extra_state"):
        assert torch.equal(a[key], b[key]), key
