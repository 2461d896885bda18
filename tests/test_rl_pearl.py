"""PEARL task families (metalab.rl.pearl; Rakelly et al. 2019, as used by Meta-Q-Learning, Fakoor
et al. 2020): fixed task lists with the right counts, splits and ranges; each reward equals its
rlkit formula computed here from the simulator's own state; the task changes the reward (or the
model) and only from the next reset; termination and truncation per family; the point robot runs
without MuJoCo."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from metalab.errors import ConfigError
from metalab.rl.pearl import (
    GOAL_FAMILIES,
    RAND_PARAMS,
    WALKER_SHAPES,
    GoalEnv,
    GoalTask,
    PointRobot,
    build_goal_families,
    get_goal_family,
)

COUNTS = {  # family -> (train, test), PEARL's
    "point-robot": (80, 20),
    "cheetah-vel": (100, 30),
    "cheetah-dir": (2, 2),
    "ant-dir": (2, 2),
    "ant-goal": (150, 30),
    "humanoid-dir": (100, 30),
    "walker-rand-params": (40, 10),
}
SAME_TRAIN_AND_TEST = {"cheetah-dir", "ant-dir"}  # the two directions are train and test tasks


def actions(env: GoalEnv, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random actions in the box, float64."""
    low, high = env.action_space.low, env.action_space.high
    return np.random.default_rng(seed).uniform(low, high, size=(n, *low.shape))


def run(env: GoalEnv, task: GoalTask, acts: np.ndarray, seed: int = 3):
    """Rewards and observations of one rollout of ``acts`` under ``task``."""
    obs, info = env.reset(seed=seed, options={"task": task})
    assert info["task"] == task.index
    observations, rewards = [obs], []
    for a in acts:
        obs, reward, *_ = env.step(a)
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


def square(a: np.ndarray) -> float:
    return float(np.sum(np.square(a)))


# --- task lists ---------------------------------------------------------------------------------


def test_task_lists_have_pearls_counts_and_are_the_same_on_every_construction() -> None:
    again = build_goal_families()
    assert set(GOAL_FAMILIES) == set(COUNTS)
    for name, (n_train, n_test) in COUNTS.items():
        family = GOAL_FAMILIES[name]
        assert (len(family.train_tasks), len(family.test_tasks)) == (n_train, n_test), name
        assert family.max_steps == 200
        assert again[name].train_tasks == family.train_tasks  # params compared too
        assert again[name].test_tasks == family.test_tasks
        for position, task in enumerate(family.tasks):
            assert (task.family, task.index) == (name, position)
            restored = json.loads(json.dumps(task.params, allow_nan=False))
            assert GoalTask(name, position, restored).describe() == task.describe() != ""
    assert GOAL_FAMILIES["cheetah-vel"].train_tasks[0].describe() == "velocity 0.79"
    # rlkit seeded 1337 for cheetah-vel: the list is rlkit's own
    velocities = [t.params["velocity"] for t in GOAL_FAMILIES["cheetah-vel"].tasks]
    np.testing.assert_array_equal(velocities, np.random.RandomState(1337).uniform(0, 3, 130))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_train_and_test_tasks_are_disjoint_except_the_two_directions(name: str) -> None:
    family = GOAL_FAMILIES[name]
    train = {json.dumps(t.params, sort_keys=True) for t in family.train_tasks}
    test = {json.dumps(t.params, sort_keys=True) for t in family.test_tasks}
    if name in SAME_TRAIN_AND_TEST:
        # PEARL's cheetah-dir and ant-dir: train and test on the same two directions
        assert family.train_tasks == family.test_tasks == family.tasks
        assert sorted(t.params["direction"] for t in family.tasks) == [-1, 1]
    else:
        n_train, n_test = COUNTS[name]
        assert [t.index for t in family.train_tasks] == list(range(n_train))
        assert [t.index for t in family.test_tasks] == list(range(n_train, n_train + n_test))
        assert len(train) == n_train and len(test) == n_test and not train & test


def test_task_parameters_are_in_their_ranges() -> None:
    fam = GOAL_FAMILIES
    velocities = np.array([t.params["velocity"] for t in fam["cheetah-vel"].tasks])
    assert velocities.min() >= 0 and velocities.max() <= 3 and velocities.std() > 0.5
    ant_goals = np.array([t.params["goal"] for t in fam["ant-goal"].tasks])
    radius = np.linalg.norm(ant_goals, axis=1)
    assert radius.max() <= 3 and radius.max() > 2.5 and (ant_goals < 0).any()
    point_goals = np.array([t.params["goal"] for t in fam["point-robot"].tasks])
    assert np.abs(point_goals).max() <= 1
    angles = np.array([t.params["angle"] for t in fam["humanoid-dir"].tasks])
    assert angles.min() >= 0 and angles.max() <= 2 * np.pi and angles.max() > np.pi
    for task in fam["walker-rand-params"].tasks:
        assert set(task.params["scales"]) == set(RAND_PARAMS)
        for array, base in RAND_PARAMS.items():
            scale = np.array(task.params["scales"][array])
            assert scale.shape == WALKER_SHAPES[array]
            assert scale.min() >= base**-3 and scale.max() <= base**3
            assert base**-3 >= 1.5**-3 and base**3 <= 1.5**3


def test_unknown_family_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'nope'.*cheetah-vel"):
        get_goal_family("nope")
    assert get_goal_family("ant-goal") is GOAL_FAMILIES["ant-goal"]


# --- point robot ------------------------------------------------------------------------------


def test_point_robot_rewards_minus_distance_clips_actions_and_truncates_at_200() -> None:
    family = GOAL_FAMILIES["point-robot"]
    env = family.make(seed=0)
    assert isinstance(env, gym.Env) and isinstance(env.unwrapped, PointRobot)
    assert isinstance(env.observation_space, gym.spaces.Box)
    assert isinstance(env.action_space, gym.spaces.Box)
    task = family.test_tasks[3]
    obs, info = env.reset(options={"task": task})
    assert obs.dtype == np.float32 and info["task"] == task.index
    np.testing.assert_array_equal(obs, [0, 0])
    goal, high = np.array(task.params["goal"]), env.action_space.high.astype(np.float64)
    position = np.zeros(2)
    for step, a in enumerate(actions(env, 200, seed=1) * 3):  # mostly outside the box
        obs, reward, terminated, truncated, info = env.step(a)
        position += np.clip(a, -high, high)
        assert reward == pytest.approx(-np.linalg.norm(position - goal), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(obs, position, rtol=1e-6, atol=1e-6)
        assert obs.dtype == np.float32 and not terminated and info["task"] == task.index
        assert truncated == (step == 199)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2))


def test_set_task_takes_effect_at_the_next_reset() -> None:
    family = GOAL_FAMILIES["point-robot"]
    env = family.make()
    first, second = family.train_tasks[0], family.test_tasks[0]
    env.reset(options={"task": first})
    env.set_task(second)
    _, reward, *_, info = env.step(np.zeros(2))
    assert env.task == first and info["task"] == first.index
    assert reward == pytest.approx(-np.linalg.norm(first.params["goal"]))
    _, info = env.reset()
    _, reward, *_, info = env.step(np.zeros(2))
    assert env.task == second and info["task"] == second.index
    assert reward == pytest.approx(-np.linalg.norm(second.params["goal"]))
    with pytest.raises(ConfigError, match="point-robot"):
        env.set_task(GOAL_FAMILIES["cheetah-vel"].train_tasks[0])


def test_point_robot_needs_no_mujoco() -> None:
    code = (
        "import sys; sys.modules['mujoco'] = None\n"
        "from metalab.rl.pearl import get_goal_family\n"
        "env = get_goal_family('point-robot').make(seed=0); env.reset()\n"
        "print(env.step(env.action_space.sample())[1] < 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]


# --- MuJoCo families --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cheetah-vel", "cheetah-dir"])
def test_cheetah_reward_is_the_formula_from_the_forward_velocity(name: str) -> None:
    family = GOAL_FAMILIES[name]
    env = family.make()
    data, dt = env.unwrapped.data, env.unwrapped.dt
    first, second = family.train_tasks[0], family.test_tasks[-1]
    acts = actions(env, 25)
    obs, _ = env.reset(seed=5, options={"task": first})
    for a in acts:
        x_before, obs_before = float(data.qpos[0]), obs
        obs, reward, terminated, truncated, info = env.step(a)
        v = (float(data.qpos[0]) - x_before) / dt
        assert (obs[0] - obs_before[0]) / dt == v == info["x_velocity"]
        if name == "cheetah-vel":
            expected = -abs(v - first.params["velocity"]) - 0.05 * square(a)
        else:
            expected = first.params["direction"] * v - 0.05 * square(a)
        assert reward == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert not terminated and not truncated
    # the same trajectory under another task: same states, other rewards
    obs_1, rewards_1 = run(env, first, acts)
    obs_2, rewards_2 = run(env, second, acts)
    np.testing.assert_array_equal(obs_1, obs_2)
    assert np.abs(rewards_1 - rewards_2).min() > 1e-3


def test_ant_dir_reward_is_the_formula_with_gymnasiums_contact_cost() -> None:
    family = GOAL_FAMILIES["ant-dir"]
    env = family.make()
    base = env.unwrapped
    obs, _ = env.reset(seed=2, options={"task": family.tasks[1]})
    assert obs.shape == (27,)  # qpos[2:] + qvel, as rlkit's AntEnv
    d = family.tasks[1].params["direction"]
    for a in actions(env, 10, seed=4):
        x_before = float(base.data.body("torso").xpos[0])
        _, reward, terminated, *_ = env.step(a)
        v = (float(base.data.body("torso").xpos[0]) - x_before) / base.dt
        contact = 5e-4 * np.sum(np.square(np.clip(base.data.cfrc_ext, -1, 1)))
        assert reward == pytest.approx(d * v - 0.5 * square(a) - contact + 1, rel=1e-12)
        assert not terminated


def test_ant_goal_reward_grows_as_the_ant_nears_the_goal() -> None:
    family = GOAL_FAMILIES["ant-goal"]
    env = family.make()
    base = env.unwrapped
    task = family.train_tasks[0]
    goal = np.array(task.params["goal"])
    obs, _ = env.reset(seed=1, options={"task": task})
    assert obs.shape == (107,)  # x, y kept
    for a in actions(env, 5, seed=6):
        obs, reward, *_ = env.step(a)
        np.testing.assert_array_equal(obs[:2], base.data.qpos[:2])
        contact = 5e-4 * np.sum(np.square(np.clip(base.data.cfrc_ext, -1, 1)))
        expected = -np.abs(obs[:2] - goal).sum() - 0.1 * square(a) - contact
        assert reward == pytest.approx(expected, rel=1e-12)
    # the same step from a start moved halfway to the goal: the reward rises by about the gain
    rewards = []
    for shift in (0.0, 0.5):
        env.reset(seed=1)
        qpos, qvel = base.data.qpos.copy(), base.data.qvel.copy()
        qpos[:2] += shift * (goal - qpos[:2])
        base.set_state(qpos, qvel)
        rewards.append(env.step(np.zeros(8))[1])
    assert rewards[1] - rewards[0] == pytest.approx(0.5 * np.abs(goal).sum(), abs=0.05)


def test_humanoid_dir_short_rollout_and_the_direction_matters() -> None:
    family = GOAL_FAMILIES["humanoid-dir"]
    env = family.make()
    base = env.unwrapped
    task = family.train_tasks[0]

    def com() -> np.ndarray:
        mass = base.model.body_mass
        return (mass @ base.data.xipos / mass.sum())[:2]

    def rollout(task: GoalTask) -> tuple[np.ndarray, np.ndarray]:
        """Rewards and forward terms of 8 steps from a start moving at (1, 0.5) m/s."""
        env.reset(seed=0, options={"task": task})
        qvel = base.data.qvel.copy()
        qvel[:2] = (1.0, 0.5)
        base.set_state(base.data.qpos.copy(), qvel)
        u = np.array([np.cos(task.params["angle"]), np.sin(task.params["angle"])])
        rewards, forwards = [], []
        for a in actions(env, 8, seed=7):
            before = com()
            _, reward, terminated, _, info = env.step(a)
            forwards.append(0.25 * float(u @ (com() - before)) / base.model.opt.timestep)
            impact = min(5e-7 * np.sum(np.square(base.data.cfrc_ext)), 10)
            expected = forwards[-1] - 0.1 * square(a) - impact + 5.0 * (not terminated)
            assert np.isfinite(reward) and reward == pytest.approx(expected, rel=1e-9)
            rewards.append(reward)
        return np.array(rewards), np.array(forwards)

    # the opposite direction, same trajectory: the forward term flips sign, nothing else changes
    rewards_1, forwards = rollout(task)
    rewards_2, _ = rollout(GoalTask("humanoid-dir", -1, {"angle": task.params["angle"] + np.pi}))
    assert np.abs(forwards).min() > 0.1
    np.testing.assert_allclose(rewards_1 - rewards_2, 2 * forwards, rtol=1e-9)


def test_walker_masses_differ_per_task_and_come_back_when_switching_back() -> None:
    family = GOAL_FAMILIES["walker-rand-params"]
    env = family.make(seed=0)
    model = env.unwrapped.model
    compiled = {name: getattr(model, name).copy() for name in RAND_PARAMS}
    first, second = family.train_tasks[0], family.test_tasks[0]
    seen = []
    for task in (first, second, first):
        env.reset(options={"task": task})
        for name in RAND_PARAMS:
            scale = np.array(task.params["scales"][name])
            np.testing.assert_allclose(getattr(model, name), compiled[name] * scale, rtol=1e-15)
        # mj_setConst ran: the derived subtree mass is that of the scaled bodies
        assert model.body_subtreemass[0] == pytest.approx(model.body_mass.sum(), rel=1e-12)
        seen.append(model.body_mass.copy())
        _, reward, *_, info = env.step(actions(env, 1)[0])
        assert reward == info["env_reward"] and np.isfinite(reward)  # Walker2d-v5's own
    assert np.abs(seen[0] - seen[1])[1:].min() > 0  # every body but the world
    np.testing.assert_array_equal(seen[0], seen[2])


@pytest.mark.parametrize(
    ("name", "coordinate", "value", "terminates"),
    [
        ("ant-dir", 2, 1.5, True),  # torso z above 1: PEARL's AntDirEnv was done
        ("ant-goal", 2, 1.5, False),  # PEARL's AntGoalEnv never was
        ("humanoid-dir", 2, 2.5, True),
        ("walker-rand-params", 1, 2.5, True),
    ],
)
def test_termination_when_unhealthy_follows_pearl(
    name: str, coordinate: int, value: float, terminates: bool
) -> None:
    env = GOAL_FAMILIES[name].make()
    base = env.unwrapped
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape))
    assert not terminated and not truncated
    qpos, qvel = base.data.qpos.copy(), base.data.qvel.copy()
    qpos[coordinate] = value
    base.set_state(qpos, qvel)
    _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape))
    assert terminated == terminates and not truncated
