"""Meta-learned curiosity's inner and outer loops: PPO, the reward pipeline, lifetimes on the
grid room, the search and the CLI (resume, eval, bad settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalab.cli import main
from metalab.errors import ConfigError
from metalab.rl import programs
from metalab.rl.curiosity import (
    COMBINERS,
    CuriosityConfig,
    make_env,
    resolve_program,
    run_lifetime,
)
from metalab.rl.curiosity_search import (
    CuriositySearch,
    Predictor,
    SearchConfig,
    candidates,
    features,
)
from metalab.rl.dsl import (
    A_T,
    Builder,
    L2Norm,
    Welford,
    enumerate_programs,
    prune_duplicates,
    structure_key,
)
from metalab.rl.ppo import PPO, PPOSettings, Rollout, gae

# --- PPO ----------------------------------------------------------------------------------------


def test_gae_matches_the_direct_sum_and_stops_at_episode_ends():
    g = torch.Generator().manual_seed(0)
    T, N, gamma, lam = 6, 2, 0.9, 0.8
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    last = torch.randn(N, generator=g, dtype=torch.float64)
    dones = torch.zeros(T, N, dtype=torch.float64)
    dones[2, 0] = 1.0  # env 0's episode ends after step 2
    adv, returns = gae(rewards, values, dones, last, gamma, lam)
    nexts = torch.cat([values[1:], last[None]])
    for i in range(N):
        for t in range(T):
            # A_t = sum_l (gamma lam)^l delta_{t+l}, cut after the episode's last step
            total, k = 0.0, t
            while k < T:
                keep = 1.0 - dones[k, i]
                delta = rewards[k, i] + gamma * nexts[k, i] * keep - values[k, i]
                total += (gamma * lam) ** (k - t) * delta
                if keep == 0:
                    break
                k += 1
            assert adv[t, i].item() == pytest.approx(total.item(), abs=1e-12)
    assert torch.allclose(returns, adv + values)


def test_ppo_learns_a_contextual_bandit():
    """Reward 1 for the action that matches the sign of the first observation: PPO's clipped
    updates must move the policy there (50% at chance)."""
    g = torch.Generator().manual_seed(0)
    agent = PPO(3, 2, True, PPOSettings(lr=1e-2, hidden=16), g)
    for _ in range(40):
        obs = torch.randn(64, 1, 3, generator=g)
        actions, logp, values = agent.act(obs[:, 0])
        rewards = (actions == (obs[:, 0, 0] > 0).long()).float()
        agent.update(
            Rollout(
                obs,
                actions[:, None],
                logp[:, None],
                values[:, None],
                rewards[:, None],
                torch.ones(64, 1),
                torch.zeros(1),
            )  # fmt: skip
        )
    obs = torch.randn(500, 3, generator=g)
    greedy = agent.net.distribution(obs).probs.argmax(-1)
    assert (greedy == (obs[:, 0] > 0).long()).float().mean() > 0.9


# --- the reward pipeline ------------------------------------------------------------------------


def test_welford_over_batches_equals_numpy_over_everything():
    rng = np.random.default_rng(0)
    stats, seen = Welford(), []
    for size in (1, 7, 3, 20):
        x = rng.normal(2.0, 3.0, size)
        stats.update(x)
        seen.extend(x)
        if len(seen) > 1:
            assert stats.std == pytest.approx(np.std(seen, ddof=1), rel=1e-12)
            assert stats.mean == pytest.approx(np.mean(seen), rel=1e-12)


def test_combiners():
    ri, re = np.array([2.0, 2.0, 2.0]), np.array([-1.0, -1.0, -1.0])
    t = np.array([0.0, 0.5, 1.0])
    assert COMBINERS["sum"](ri, re, t, 0.5).tolist() == [0.0, 0.0, 0.0]
    annealed = COMBINERS["anneal"](ri, re, t, 1.0)
    assert annealed.tolist() == pytest.approx([2.0, 0.5, -1.0])  # curiosity first, then the task


# --- environments and lifetimes -----------------------------------------------------------------


def test_empty_room_observes_the_agent_and_counts_distinct_states():
    env = make_env("grid-15")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (15 * 15 * 3,) and obs.min() >= 0.0 and obs.max() <= 1.0
    grid = obs.reshape(15, 15, 3) * 10
    assert grid[1, 1].tolist() == [10, 0, 0]  # agent (10), red (0), facing east (0) at (1, 1)
    assert env.unwrapped.visited == {(1, 1, 0)}
    env.step(1)  # turn right: same cell, new direction
    env.step(2)  # forward: now facing south, one cell down
    assert env.unwrapped.visited == {(1, 1, 0), (1, 1, 1), (1, 2, 1)}
    for _ in range(5):
        env.step(0)  # turning left 5 times from south: east, north, west, south, east
    assert len(env.unwrapped.visited) == 6  # (1, 2) in all four directions


def test_curious_agent_explores_more_than_an_incurious_one():
    """The paper's search signal on the grid room: FAST's agent visits far more distinct states
    than PPO without intrinsic reward, with the same seeds and budget."""
    c = CuriosityConfig(env="grid-15", envs=3, steps=300)  # ratio 2.1-2.2 on seed pairs 0-5
    plain = [run_lifetime(programs.no_curiosity(), c, seed).score for seed in (0, 1)]
    curious = [run_lifetime(programs.fast(), c, seed).score for seed in (0, 1)]
    assert np.mean(curious) > 1.5 * np.mean(plain), (curious, plain)


def test_a_lifetime_is_a_function_of_its_seed_and_runs_on_continuous_actions():
    c = CuriosityConfig(env="hopper", envs=1, steps=64, frames=32, chunk=8, minibatches=2)
    a, b = (run_lifetime(programs.rnd(), c, seed=3) for _ in range(2))
    assert a.score == b.score and a.curve == b.curve and a.episodes >= 1


def test_centering_turns_a_constant_bonus_into_no_bonus():
    """A constant bonus (here ||a_t||, the same for every one-hot action; count-based bonuses on
    states that never repeat, like Acrobot's, are the same) divided by its std stays 1; centred
    it is 0, and the lifetime is exactly the incurious one."""
    b = Builder()
    constant = b.program(b.add(L2Norm(), A_T))
    c = CuriosityConfig(env="grid-15", envs=2, steps=120, center=True)
    plain = run_lifetime(programs.no_curiosity(), c, seed=0)
    centred = run_lifetime(constant, c, seed=0)
    assert centred.curve == plain.curve
    uncentred = run_lifetime(constant, c.updated(center=False), seed=0)
    assert uncentred.curve != plain.curve


# --- the search ---------------------------------------------------------------------------------


def test_candidates_are_deterministic_cached_named_and_resolvable(tmp_path, monkeypatch):
    pool = candidates(3)
    fresh = [structure_key(p) for p in prune_duplicates(list(enumerate_programs(3)))]
    assert [structure_key(p) for p in pool] == fresh
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    built = candidates.__wrapped__(3)  # builds and writes the cache file
    (cached,) = tmp_path.glob("curiosity-candidates-3-*.pkl")
    assert [structure_key(p) for p in candidates.__wrapped__(3)] == fresh  # read back
    cached.write_bytes(b"damaged")
    assert [structure_key(p) for p in candidates.__wrapped__(3)] == fresh  # rebuilt
    assert len(built) == len(fresh)
    assert structure_key(resolve_program("candidate:3:5")) == structure_key(pool[5])
    with pytest.raises(ConfigError, match="candidate:3:999.*there are"):
        resolve_program("candidate:3:999")
    with pytest.raises(ConfigError, match="unknown curiosity program 'curious'"):
        resolve_program("curious")


def test_predictor_recovers_a_linear_score_of_structure():
    pool = candidates(4)
    search = CuriositySearch(SearchConfig(max_ops=4))
    x = np.stack([features(p, search.vocabulary) for p in pool])
    w = np.random.default_rng(0).normal(size=x.shape[1])
    y = x @ w
    predicted = Predictor(alpha=1e-6).fit(x[:120], y[:120]).predict(x[120:])
    assert np.corrcoef(predicted, y[120:])[0, 1] > 0.99


def test_search_warms_up_at_random_then_follows_the_regressor():
    search = CuriositySearch(SearchConfig(max_ops=3, warmup=3, seed=0))
    history = []
    for k in range(3):
        index, predicted = search.next_program(history)
        assert predicted is None and index not in {r["index"] for r in history}
        history.append({"index": index, "score": float(k)})
    index, predicted = search.next_program(history)
    assert predicted is not None and index not in {r["index"] for r in history}
    fitted = Predictor().fit(search.x[[r["index"] for r in history]], np.arange(3.0))
    left = [i for i in range(len(search.pool)) if i not in {r["index"] for r in history}]
    assert predicted == pytest.approx(fitted.predict(search.x[left]).max())


# --- the command line ---------------------------------------------------------------------------


SHORT = ["--envs", "2", "--steps", "24", "--frames", "12", "--no-progress"]


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def test_cli_curiosity_resumes_trial_by_trial_and_evaluates(tmp_path, capsys):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train = ["train", "curiosity", "--program", "count_based", *SHORT]
    main([*train, "--trials", "1", "--run-dir", str(run)])
    main(["train", "curiosity", "--trials", "2", "--run-dir", str(run), "--resume", *SHORT])
    main([*train, "--trials", "2", "--run-dir", str(fresh)])
    assert [r["score"] for r in rows_of(run)] == [r["score"] for r in rows_of(fresh)]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    stored = json.loads((run / "eval.json").read_text())
    assert stored["rows"]["count_based"]["trials"] == 2 and "count_based" in out
    assert main(["eval", str(run), "--episodes", "3"]) == 2
    assert "scored by its own lifetimes" in capsys.readouterr().err


def test_cli_search_scores_programs_once_and_resumes(tmp_path, capsys):
    run = tmp_path / "search"
    args = ["train", "curiosity-search", "--max-ops", "3", "--warmup", "2", "--trials", "1"]
    main([*args, "--budget", "2", "--run-dir", str(run), *SHORT])
    main([*args, "--budget", "3", "--run-dir", str(run), "--resume", *SHORT])
    rows = rows_of(run)
    assert len({r["index"] for r in rows}) == 3 and rows[2]["predicted"] is not None
    main(["eval", str(run)])
    stored = json.loads((run / "eval.json").read_text())
    best = max(rows, key=lambda r: r["score"])
    assert next(iter(stored["rows"])) == best["name"] == f"candidate:3:{best['index']}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--program", "curious"], "unknown curiosity program 'curious'"),
        (["--env", "maze"], "--env: invalid choice: 'maze'"),
        (["--chunk", "5"], "chunk=5 must divide frames=12"),
        (["--combiner", "max"], "--combiner: invalid choice: 'max'"),
        (["--program", "candidate:3:999"], "there are 21 candidates with at most 3 operations"),
    ],
)
def test_cli_bad_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    try:
        code = main(["train", "curiosity", *flags, "--run-dir", str(tmp_path / "r"), *SHORT])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_search_in_worker_processes_scores_the_same_programs(tmp_path):
    """--workers 2 scores programs in two processes; a lifetime depends only on its seed, so the
    warm-up programs get the scores the one-process search gives them."""
    args = ["train", "curiosity-search", "--max-ops", "3", "--warmup", "2", "--trials", "1"]
    for workers in ("1", "2"):
        run = tmp_path / f"w{workers}"
        main([*args, "--budget", "3", "--workers", workers, "--run-dir", str(run), *SHORT])
    rows = {w: rows_of(tmp_path / f"w{w}") for w in ("1", "2")}
    scores = {w: {r["index"]: r["score"] for r in rows[w]} for w in rows}
    warm = [r["index"] for r in rows["1"][:2]]
    assert sorted(scores["2"]) == sorted(set(scores["2"])) and len(scores["2"]) == 3
    assert all(scores["2"][i] == scores["1"][i] for i in warm)
