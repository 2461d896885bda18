"""MAML and first-order MAML end to end: they learn (sinusoids, real Omniglot), resume exactly, and
N processes take the step one process takes with the whole meta-batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from metalab.cli import main
from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import evaluate, evaluate_regression
from metalab.methods.maml import FOMAML, MAML
from metalab.rundir import load_checkpoint, load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.train import train

SINE = MAML.recipe("sinusoid").updated(episodes=600, backend="vmap")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def test_maml_learns_sinusoids_in_seconds(tmp_path):
    train("maml", SINE, tmp_path / "run", progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    before, after = evaluate_regression(method, shots=10, tasks=200, steps=(0, 10))
    # Predicting 0 scores E[A^2]/2 = 4.2; fitting the mean curve ~3. After adaptation MAML is far
    # below either (the paper reaches ~0.3 with K = 10 after 70,000 iterations).
    assert after.mean < 1.5, after
    assert after.mean < 0.5 * before.mean, (before, after)
    assert after.protocol["metric"] == "mse" and after.protocol["steps"] == 10


def test_resume_gives_the_same_weights(tmp_path):
    """The first half chooses its backend by probing; the resumed half keeps it, and equals a
    straight run with that backend fixed."""
    config = SINE.updated(episodes=20, backend="auto")
    train("maml", config.updated(episodes=10), tmp_path / "resumed", progress=False)
    train("maml", config, tmp_path / "resumed", resume=True, progress=False)
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    chosen = b["config"]["arithmetic"]["settings"]["backend"]
    assert chosen in ("vmap", "loop") and b["model"]["_extra_state"]["backend"] == chosen
    train("maml", config.updated(backend=chosen), tmp_path / "straight", progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert a["episode"] == b["episode"] == 20
    for key, value in a["model"].items():
        if key != "_extra_state":
            assert torch.equal(value, b["model"][key]), key


def test_first_order_is_a_different_method(tmp_path):
    assert FOMAML.recipe("omniglot-5w1s").first_order
    assert not MAML.recipe("omniglot-5w1s").first_order
    config = SINE.updated(episodes=3)
    train("maml", config, tmp_path / "second", progress=False)
    train(
        "fomaml",
        FOMAML.Config(**vars(config) | {"first_order": True}),
        tmp_path / "first",
        progress=False,
    )
    first = load_checkpoint(tmp_path / "first" / "checkpoint.pt")
    second = load_checkpoint(tmp_path / "second" / "checkpoint.pt")
    assert first["method"] == "fomaml" and first["config"]["first_order"]
    weight = "net.layers.0.weight"
    assert not torch.allclose(first["model"][weight], second["model"][weight], rtol=0, atol=1e-7)


@pytest.mark.realdata
def test_maml_learns_omniglot_quickly(omniglot_root, tmp_path):
    config = MAML.recipe("omniglot-5w1s").updated(
        episodes=60, meta_batch=8, hidden=32, val_every=0, backend="loop"
    )
    torch.manual_seed(0)
    train("maml", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    test = omniglot("vinyals", "test", omniglot_root)
    result = evaluate(method, EpisodeSampler(test, 5, 1, 5, seed=7), episodes=100)
    assert result.mean > 0.6, result  # chance is 0.2
    with pytest.raises(ConfigError, match="5-way output layer"):
        evaluate(method, EpisodeSampler(test, 20, 1, 1, seed=7), episodes=1)


def test_sinusoid_eval_writes_the_table_and_the_figure(tmp_path, capsys):
    train("maml", SINE.updated(episodes=5), tmp_path / "maml", progress=False)
    train(
        "maml",
        MAML.recipe("sinusoid-pretrained").updated(episodes=5),
        tmp_path / "pre",
        progress=False,
    )
    assert (
        main(
            [
                "eval",
                str(tmp_path / "maml"),
                "--baseline",
                str(tmp_path / "pre"),
                "--episodes",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "pretrained (pre)" in out and "maml (maml)" in out
    assert (tmp_path / "maml" / "sinusoid.png").stat().st_size > 10_000


@pytest.mark.realdata
def test_ways_beyond_the_head_are_refused_by_the_cli(omniglot_root, tmp_path, capsys):
    config = MAML.recipe("omniglot-5w1s").updated(episodes=1, meta_batch=2, hidden=8, val_every=0)
    train("maml", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    assert main(["eval", str(tmp_path / "run"), "--ways", "20", "--shots", "1"]) == 2
    assert "5-way model: evaluate it with --ways 5" in capsys.readouterr().err


def test_fewer_ways_are_answered_by_the_first_output_units():
    """The CACTUs code tests its 20-way models on 5-way tasks with the first 5 logits: the same
    answer as a 3-way model holding the first 3 rows of a 5-way model's output layer."""
    torch.manual_seed(0)
    config = MAML.Config(ways=5, hidden=8, eval_inner_steps=2, channels_last="off")
    five = MAML(config).double()
    three = MAML(config.updated(ways=3)).double()
    three.load_state_dict(
        {k: v[:3] if k.startswith("net.head.") else v for k, v in five.state_dict().items()}
    )
    x = torch.rand(9, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(3)
    query = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    assert five.supports_ways(3) and not five.supports_ways(6)
    torch.testing.assert_close(five.predict(x, y, query), three.predict(x, y, query))
    with pytest.raises(ConfigError, match="3-way output layer"):
        three.predict(torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.arange(5), query)


def _torchrun(tmp_path, name: str, processes: int) -> dict:
    run_dir = tmp_path / name
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "metalab", "train", "maml",
        "--recipe", "sinusoid", "--episodes", "4", "--meta-batch", "5", "--backend", "loop",
        "--run-dir", str(run_dir), "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoint.pt")


def test_two_processes_take_the_single_process_step(tmp_path):
    """gloo, 2 ranks sharing meta-batches of 5 tasks (3 + 2: the shares are weighted)."""
    one, two = _torchrun(tmp_path, "one", 1), _torchrun(tmp_path, "two", 2)
    assert one["episode"] == two["episode"] == 4
    for key, value in one["model"].items():
        if key != "_extra_state":
            assert torch.allclose(value, two["model"][key], rtol=1e-5, atol=1e-6), key
    torch.manual_seed(SINE.seed)  # as train() does before building the method
    init = MAML(SINE).state_dict()
    assert not torch.allclose(init["net.layers.0.weight"], two["model"]["net.layers.0.weight"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "best.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "sinusoid.png", "tb",
    ]  # fmt: skip
