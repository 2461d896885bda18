"""The rl/ foundation: replay windows stay inside rollouts, the dynamics model's standardisation,
the collect-fit trainer resumes exactly and refuses bad settings in one line, `metalab train` /
`metalab eval` for an RL method, and a learning test: MPC on a fitted model outruns random
actions on the real simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalab.cli import main
from metalab.errors import ConfigError
from metalab.rl.envs import Perturbation
from metalab.rl.grbal import GrBALConfig
from metalab.rl.mb import MB, MBConfig
from metalab.rl.rollout import RandomController, Replay, Trajectory, rollout
from metalab.rl.train import load_rl_checkpoint, train_rl

TINY = {
    "episode_steps": 40,
    "random_rollouts": 3,
    "iterations": 2,
    "rollouts": 1,
    "hidden": 16,
    "epochs": 2,
    "candidates": 20,
    "plan_horizon": 3,
    "test_rollouts": 1,
}


def trajectory(steps: int, offset: float) -> Trajectory:
    obs = offset + np.arange(steps + 1, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return Trajectory(obs, np.zeros((steps, 2), np.float32), np.zeros(steps), -np.ones(steps, int))


def test_replay_windows_never_cross_a_rollout() -> None:
    replay = Replay([trajectory(5, 0.0), trajectory(2, 100.0), trajectory(4, 200.0)])
    obs, actions, next_obs = replay.transitions()
    assert len(replay) == len(obs) == 11
    np.testing.assert_array_equal(next_obs[:, 0] - obs[:, 0], np.ones(11))  # aligned pairs
    starts = replay.windows(3)
    np.testing.assert_array_equal(starts, [0, 1, 2, 7, 8])  # the 2-step rollout has none
    for s in starts:  # consecutive states of one rollout throughout
        np.testing.assert_array_equal(np.diff(obs[s : s + 3, 0]), [1.0, 1.0])
    restored = Replay.from_state(replay.state())
    np.testing.assert_array_equal(restored.transitions()[0], obs)


def test_the_model_predicts_standardised_state_changes() -> None:
    method = MB(MBConfig(hidden=8))
    env = method.family.make()
    rng = np.random.default_rng(0)
    random = RandomController(env.action_space.low, env.action_space.high, rng)
    replay = Replay([rollout(env, random, 50, Perturbation(), seed=0)])
    model = method.model
    model.set_statistics(*replay.transitions())
    obs, actions, next_obs = map(torch.as_tensor, replay.transitions())
    x, y = model.encode(obs, actions, next_obs)
    assert x.shape[1] == method.obs_dim - 1 + method.act_dim  # no absolute x position
    torch.testing.assert_close(y.mean(0), torch.zeros(method.obs_dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        y.std(0, unbiased=False), torch.ones(method.obs_dim), atol=1e-3, rtol=0
    )
    # step() undoes the standardisation: feeding the true change back gives the true next state.
    params = model.params()
    with torch.no_grad():
        predicted = model.step(params, obs, actions)
        change = model.net(x) * model.out_std + model.out_mean
    torch.testing.assert_close(predicted, obs + change)
    # The position is not an input: shifting x shifts the prediction by the same amount.
    shifted = obs.clone()
    shifted[:, 0] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(model.step(params, shifted, actions)[:, 0], predicted[:, 0] + 5)


def test_mpc_on_a_fitted_model_outruns_random_actions() -> None:
    """The intact cheetah: 20 random rollouts of 100 steps, one fit, then MPC (the CPU recipe's
    500 candidates x horizon 10) from three fresh starts against random actions from the same
    starts. Random actions earn about nothing (control cost, no progress); the planner must run
    forward."""
    torch.manual_seed(0)
    method = MB(MBConfig(epochs=60, patience=10))
    env = method.family.make()
    rng = np.random.default_rng(0)
    random = RandomController(env.action_space.low, env.action_space.high, rng)
    replay = Replay([rollout(env, random, 100, Perturbation(), seed=s) for s in range(20)])
    method.fit(replay, method.make_optimizer(), rng)
    starts = [100, 101, 102]
    baseline = [rollout(env, random, 60, Perturbation(), seed=s).total for s in starts]
    planned = [
        rollout(env, method.controller(torch.Generator().manual_seed(s)), 60, Perturbation(),
                seed=s).total
        for s in starts
    ]  # fmt: skip
    assert np.mean(planned) > np.mean(baseline) + 10, (planned, baseline)


def test_training_resumes_exactly(tmp_path) -> None:
    config = MBConfig(**TINY)
    whole = train_rl("mb", config, tmp_path / "whole", progress=False)
    assert (whole.iterations, whole.transitions) == (3, 3 * 40 + 2 * 40)
    train_rl("mb", config.updated(iterations=1), tmp_path / "split", progress=False)
    resumed = train_rl("mb", config, tmp_path / "split", resume=True, progress=False)
    assert resumed.iterations == 3
    a = load_rl_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_rl_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0)
    for x, y in zip(a["replay"], b["replay"]):
        np.testing.assert_array_equal(x["obs"], y["obs"])
    assert [r["return"] for r in a["history"]] == [r["return"] for r in b["history"]]
    assert (tmp_path / "whole" / "returns.png").stat().st_size > 0
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"planner": "mppi"}, "planner='mppi'"),
        ({"random_rollouts": 1}, "random_rollouts=1"),
        ({"task": "hopper-mass"}, "'hopper-mass'"),
        ({"hidden": 0}, "hidden=0"),
        ({"episode_steps": 20}, "past \\+ future = 32"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, change, message) -> None:
    method, config = ("grbal", GrBALConfig) if "episode_steps" in change else ("mb", MBConfig)
    with pytest.raises(ConfigError, match=message):
        train_rl(method, config(**{**TINY, **change}), tmp_path / "run", progress=False)


def test_cli_trains_and_evaluates_an_rl_run(tmp_path, capsys) -> None:
    run = tmp_path / "grbal"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "grbal", "--run-dir", str(run), "--no-progress", *flags]) == 0
    assert "3 iterations, 200 transitions" in capsys.readouterr().out
    assert main(["train", "grbal", "--run-dir", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "mb", "--run-dir", str(run), "--resume", "--no-progress"]) == 2
    assert "is a 'grbal' checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run), "--test-time", "planner=cem"]) == 0
    out = capsys.readouterr().out
    assert "GrBAL without adaptation" in out and "unseen" in out
    stored = json.loads((run / "eval.json").read_text())
    assert stored["config"]["planner"] == "cem"
    assert set(stored["rows"]) == {"GrBAL", "GrBAL without adaptation"}
    for row in stored["rows"].values():
        assert {"seen", "unseen", "switch"} <= set(row)
        assert len(row["error"]) == 10 and all(np.isfinite(row["error"]))
    assert main(["eval", str(run), "--test-time", "hidden=3"]) == 2
    assert "can change" in capsys.readouterr().err
    assert main(["eval", str(run), "--ways", "5"]) == 2
    assert "is an RL run" in capsys.readouterr().err
