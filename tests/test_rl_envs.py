"""Perturbed MuJoCo task families (metalab.rl.envs): rewards from states match the env's, a broken
part really changes the dynamics and only that part, reset restores the model, mid-episode switches
happen at the asked step, Ant legs map to the right geoms and actuators, and test conditions."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch

from metalab.errors import ConfigError
from metalab.rl.envs import TASKS, Perturbation, PerturbedEnv, get_task

CHEETAH, ANT = TASKS["cheetah-joint"], TASKS["ant-leg"]
BFOOT, FTHIGH, FFOOT = (CHEETAH.parts.index(n) for n in ("bfoot", "fthigh", "ffoot"))
ANT_LEG_GEOMS = {
    0: ("left_leg_geom", "left_ankle_geom"),
    1: ("right_leg_geom", "right_ankle_geom"),
    2: ("back_leg_geom", "third_ankle_geom"),
    3: ("rightback_leg_geom", "fourth_ankle_geom"),
}


@pytest.fixture(scope="module")
def cheetah() -> PerturbedEnv:
    return CHEETAH.make()


@pytest.fixture(scope="module")
def ant() -> PerturbedEnv:
    return ANT.make()


def actions(env: PerturbedEnv, steps: int, seed: int = 0) -> np.ndarray:
    low, high = env.action_space.low, env.action_space.high
    return np.random.default_rng(seed).uniform(low, high, (steps, *env.action_space.shape))


def rollout(
    env: PerturbedEnv, perturbation: Perturbation, acts: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Observations (T+1, obs_dim), rewards (T,) and step infos of one seeded rollout."""
    obs, info = env.reset(seed=seed, options={"perturbation": perturbation})
    assert info["perturbation"] == perturbation
    observations, rewards, infos = [obs], [], []
    for a in acts:
        obs, reward, terminated, truncated, info = env.step(a)
        assert not terminated and not truncated
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
    return np.array(observations), np.array(rewards), infos


def model_arrays(env: PerturbedEnv) -> dict[str, np.ndarray]:
    return {n: getattr(env.model, n).copy() for n in ("actuator_gear", "geom_size", "geom_pos")}


@pytest.mark.parametrize(("family", "part"), [(CHEETAH, BFOOT), (ANT, 1)])
def test_reward_from_states_equals_env_reward(family, part):
    env = family.make(seed=0)
    acts = actions(env, 40)
    obs, rewards, infos = rollout(env, Perturbation(part=part), acts)
    assert obs.shape == (41, 18 if family is CHEETAH else 29)
    assert obs[:, family.model_input].shape[1] == obs.shape[1] - (1 if family is CHEETAH else 2)
    assert obs[-1, 0] == env.data.qpos[0]  # obs[0] is the absolute x
    as_torch = [torch.from_numpy(x) for x in (obs[:-1], acts, obs[1:])]
    predicted = family.reward(*as_torch, dt=env.dt)
    assert predicted.dtype == torch.float64 and predicted.shape == (40,)
    np.testing.assert_allclose(predicted.numpy(), rewards, rtol=0, atol=1e-8)
    assert rewards.std() > 0.1  # not a constant: the robot moves
    gym_rewards = np.array([i["env_reward"] for i in infos])
    if family is CHEETAH:  # gymnasium's own reward is the same quantity
        np.testing.assert_allclose(gym_rewards, rewards, rtol=0, atol=1e-8)
    else:  # gymnasium's Ant velocity lags one physics substep behind qpos
        assert np.abs(gym_rewards - rewards).max() < 0.1
        assert not np.allclose(gym_rewards, rewards, rtol=0, atol=1e-6)
    # batched over any leading dims
    stacked = family.reward(*(x.reshape(2, 20, -1) for x in as_torch), dt=env.dt)
    assert torch.equal(stacked.reshape(-1), predicted)


def test_disabled_joint_changes_the_dynamics_only_when_asked(cheetah):
    acts = actions(cheetah, 40)
    intact, _, _ = rollout(cheetah, Perturbation(), acts)
    again, _, _ = rollout(cheetah, Perturbation(), acts)
    assert np.array_equal(intact, again)
    disabled, rewards, infos = rollout(cheetah, Perturbation(part=BFOOT), acts)
    assert np.array_equal(disabled[0], intact[0])  # the perturbation does not move the start state
    assert np.abs(disabled[1:] - intact[1:]).max() > 1e-3
    assert all(i["part"] == BFOOT for i in infos)
    assert cheetah.model.actuator_gear[BFOOT, 0] == 0
    assert np.count_nonzero(cheetah.model.actuator_gear[:, 0]) == 5

    other = acts.copy()
    other[:, BFOOT] = -acts[:, BFOOT]
    same, other_rewards, _ = rollout(cheetah, Perturbation(part=BFOOT), other)
    assert np.array_equal(same, disabled)  # the action on the disabled joint has no effect...
    # ... but it still pays its control cost, in the env as in the reward from states
    np.testing.assert_allclose(other_rewards, rewards, rtol=0, atol=1e-12)
    cost = acts.copy()
    cost[:, BFOOT] = 0.5 * acts[:, BFOOT]
    _, cheaper, _ = rollout(cheetah, Perturbation(part=BFOOT), cost)
    expected = rewards + CHEETAH.ctrl_cost * 0.75 * acts[:, BFOOT] ** 2
    np.testing.assert_allclose(cheaper, expected, rtol=0, atol=1e-10)

    other = acts.copy()
    other[:, FTHIGH] = -acts[:, FTHIGH]
    changed, _, _ = rollout(cheetah, Perturbation(part=BFOOT), other)
    assert np.abs(changed[1:] - disabled[1:]).max() > 1e-3


@pytest.mark.parametrize(
    ("family", "perturbation"),
    [
        (CHEETAH, Perturbation(part=BFOOT, switch_at=5, switch_to=FFOOT)),
        (ANT, Perturbation(part=2, switch_at=5, switch_to=3)),
    ],
)
def test_reset_restores_the_compiled_model(family, perturbation):
    fresh = model_arrays(family.make())
    env = family.make()
    rollout(env, perturbation, actions(env, 10))
    broken = model_arrays(env)
    assert any(not np.array_equal(broken[n], fresh[n]) for n in fresh)
    env.reset(seed=1, options={"perturbation": Perturbation()})
    for name, array in model_arrays(env).items():
        assert np.array_equal(array, fresh[name]), name
    # perturbations do not accumulate: the same part twice is broken once
    for _ in range(2):
        env.reset(options={"perturbation": Perturbation(part=perturbation.switch_to)})
    once = model_arrays(env)
    ids = env.part_ids[perturbation.switch_to]
    assert (once["actuator_gear"][list(ids.actuators)] == 0).all()
    if ids.geoms:
        g = list(ids.geoms)
        assert np.array_equal(once["geom_size"][g], 0.5 * fresh["geom_size"][g])
    env.reset()  # no options: intact
    assert np.array_equal(model_arrays(env)["actuator_gear"], fresh["actuator_gear"])


def test_mid_episode_switch(cheetah):
    switch_at, steps = 10, 25
    switch = Perturbation(part=BFOOT, switch_at=switch_at, switch_to=FFOOT)
    assert switch.describe(CHEETAH) == "bfoot -> ffoot at step 10"
    acts = actions(cheetah, steps, seed=1)
    switched, _, infos = rollout(cheetah, switch, acts)
    assert [i["part"] for i in infos] == [BFOOT] * switch_at + [FFOOT] * (steps - switch_at)
    assert [i["step"] for i in infos] == list(range(steps))
    assert cheetah.perturbation == switch and cheetah.part == FFOOT
    first, _, _ = rollout(cheetah, Perturbation(part=BFOOT), acts)
    # obs[t] is the state before step t: equal up to the switch, different after
    assert np.array_equal(switched[: switch_at + 1], first[: switch_at + 1])
    assert np.abs(switched[switch_at + 1] - first[switch_at + 1]).max() > 1e-6

    late = acts.copy()
    late[switch_at:, FFOOT] = -acts[switch_at:, FFOOT]
    assert np.array_equal(rollout(cheetah, switch, late)[0], switched)  # ffoot off from switch_at
    early = acts.copy()
    early[switch_at - 1, FFOOT] = -acts[switch_at - 1, FFOOT]
    assert not np.array_equal(rollout(cheetah, switch, early)[0], switched)  # on before it
    bfoot = acts.copy()
    bfoot[switch_at:, BFOOT] = -acts[switch_at:, BFOOT]
    assert not np.array_equal(rollout(cheetah, switch, bfoot)[0], switched)  # bfoot back on


def test_switch_to_intact_and_at_step_zero(cheetah):
    acts = actions(cheetah, 6, seed=2)
    to_intact, _, infos = rollout(cheetah, Perturbation(part=BFOOT, switch_at=3), acts)
    assert [i["part"] for i in infos] == [BFOOT] * 3 + [None] * 3
    assert cheetah.model.actuator_gear[BFOOT, 0] > 0
    at_zero = rollout(cheetah, Perturbation(part=BFOOT, switch_at=0, switch_to=FFOOT), acts)[0]
    assert np.array_equal(at_zero, rollout(cheetah, Perturbation(part=FFOOT), acts)[0])


def test_ant_crippled_leg_halves_its_geoms_and_disables_its_actuators(ant):
    fresh = model_arrays(ANT.make())
    geom = {mujoco.mj_id2name(ant.model, mujoco.mjtObj.mjOBJ_GEOM, g): g for g in range(14)}
    joint_of = [
        mujoco.mj_id2name(ant.model, mujoco.mjtObj.mjOBJ_JOINT, ant.model.actuator_trnid[a, 0])
        for a in range(ant.model.nu)
    ]
    for leg in range(4):
        ant.reset(options={"perturbation": Perturbation(part=leg)})
        assert Perturbation(part=leg).describe(ANT) == f"leg {leg} crippled"
        arrays = model_arrays(ant)
        legs = [geom[n] for n in ANT_LEG_GEOMS[leg]]
        assert ant.part_ids[leg].geoms == tuple(legs)
        for name in ("geom_size", "geom_pos"):
            assert np.array_equal(arrays[name][legs], 0.5 * fresh[name][legs])
            others = [g for g in range(ant.model.ngeom) if g not in legs]
            assert np.array_equal(arrays[name][others], fresh[name][others])
        dead = [a for a in range(8) if joint_of[a] in (f"hip_{leg + 1}", f"ankle_{leg + 1}")]
        assert len(dead) == 2 and ant.part_ids[leg].actuators == tuple(dead)
        assert (arrays["actuator_gear"][dead] == 0).all()
        alive = [a for a in range(8) if a not in dead]
        assert np.array_equal(arrays["actuator_gear"][alive], fresh["actuator_gear"][alive])
    # halved capsules still start at their joint: the foot's end at the ankle body's origin
    size, pos = model_arrays(ant)["geom_size"], model_arrays(ant)["geom_pos"]
    foot = geom["fourth_ankle_geom"]
    assert np.isclose(np.linalg.norm(pos[foot]), size[foot, 1])
    assert ant.part_ids[3].actuators == (0, 1)  # Ant-v5 lists hip_4/ankle_4 first

    acts = actions(ant, 20)
    crippled, _, _ = rollout(ant, Perturbation(part=3), acts)
    intact, _, _ = rollout(ant, Perturbation(), acts)
    assert np.abs(crippled[1:] - intact[1:]).max() > 1e-3
    other = acts.copy()
    other[:, :2] = -acts[:, :2]  # leg 3's actuators
    assert np.array_equal(rollout(ant, Perturbation(part=3), other)[0], crippled)
    other = acts.copy()
    other[:, 2:4] = -acts[:, 2:4]  # leg 0's
    assert not np.array_equal(rollout(ant, Perturbation(part=3), other)[0], crippled)


@pytest.mark.parametrize("family", [CHEETAH, ANT])
def test_test_conditions_and_training_draws(family):
    conditions = family.test_conditions(6)
    assert conditions == family.test_conditions(6)
    names = [name for name, _ in conditions]
    assert names == ["seen"] * 6 + ["unseen"] * 6 + ["switch"] * 6
    seen = [p.part for name, p in conditions if name == "seen"]
    assert set(seen) == set(family.train_parts)
    assert all(p.switch_at is None for name, p in conditions if name == "seen")
    assert family.test["unseen"].part not in family.train_parts
    assert all(p == family.test[name] for name, p in conditions if name != "seen")
    with pytest.raises(ConfigError, match="rollouts=0"):
        family.test_conditions(0)

    draws = [family.sample_train(np.random.default_rng(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    parts = [family.sample_train(rng).part for _ in range(200)]
    assert set(parts) == set(family.train_parts)
    assert min(np.bincount(parts)[list(family.train_parts)]) > 200 / len(family.train_parts) / 2


def test_named_conditions():
    assert CHEETAH.test["unseen"].describe(CHEETAH) == "ffoot disabled"
    assert CHEETAH.test["switch"].describe(CHEETAH) == "bfoot -> ffoot at step 100"
    assert ANT.test["unseen"].describe(ANT) == "leg 3 crippled"
    assert ANT.test["switch"].describe(ANT) == "leg 0 -> leg 3 at step 100"
    assert Perturbation().describe(ANT) == "intact"
    assert CHEETAH.parts == ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")
    assert CHEETAH.train_parts == (1, 2, 3, 4) and ANT.train_parts == (0, 1, 2)


def test_bad_names_and_parts(cheetah):
    assert get_task("ant-leg") is ANT
    with pytest.raises(ConfigError, match="'nope'.*cheetah-joint, ant-leg"):
        get_task("nope")
    with pytest.raises(ConfigError, match="part=6"):
        cheetah.reset(options={"perturbation": Perturbation(part=6)})
    with pytest.raises(ConfigError, match="switch_at=-1"):
        Perturbation(part=1, switch_at=-1, switch_to=2)
    with pytest.raises(RuntimeError, match="reset"):
        CHEETAH.make().step(np.zeros(6))


def test_make_seed_and_no_time_limit():
    a, b = CHEETAH.make(seed=3), CHEETAH.make(seed=3)
    assert np.array_equal(a.reset()[0], b.reset()[0])
    assert not np.array_equal(a.reset()[0], CHEETAH.make(seed=4).reset()[0])
    env = CHEETAH.make(frame_skip=1)
    assert env.dt == pytest.approx(0.01)
    env.reset(seed=0)
    for _ in range(1001):  # past gymnasium's default 1000-step limit
        *_, terminated, truncated, _ = env.step(np.zeros(6))
    assert not terminated and not truncated
