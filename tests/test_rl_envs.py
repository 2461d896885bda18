"""Perturbed MuJoCo task families (metalab.rl.envs): rewards from states match the env's, a broken
part really changes the dynamics and only that part, reset restores the model, mid-episode switches
happen at the asked step, Ant legs map to the right geoms and actuators, and test conditions. The
damping and torso-mass families: the edited arrays hold the scaled values, the mass edit gives the
model the compiler would give, and restoring gives back the compiled model bit for bit."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import torch

from metalab.errors import ConfigError
from metalab.rl.envs import (
    EDITED_ARRAYS,
    TASKS,
    Edit,
    PartEdits,
    Perturbation,
    PerturbedEnv,
    get_task,
)

CHEETAH, ANT = TASKS["cheetah-joint"], TASKS["ant-leg"]
DAMPING, MASS = TASKS["cheetah-damping"], TASKS["cheetah-mass"]
#: (family, x1 level, an extreme level) for the families that scale physical parameters
SCALED = [(DAMPING, "damping x1", "damping x8"), (MASS, "torso mass x1", "torso mass x3")]
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


@pytest.mark.parametrize("family", [CHEETAH, ANT, DAMPING, MASS])
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


# ---- families that scale physical parameters: cheetah-damping, cheetah-mass


@pytest.fixture(scope="module")
def scaled() -> dict[str, PerturbedEnv]:
    return {family.name: family.make() for family, _, _ in SCALED}


def every_model_array(env: PerturbedEnv) -> dict[str, np.ndarray]:
    """Copies of all the compiled model's arrays and its statistics (not only the edited ones)."""
    arrays = {}
    for name in dir(env.model):
        value = None if name.startswith("_") else getattr(env.model, name)
        if isinstance(value, np.ndarray):
            arrays[name] = value.copy()
    for name in ("meaninertia", "meanmass", "meansize", "extent", "center"):
        arrays[f"stat.{name}"] = np.array(getattr(env.model.stat, name))
    return arrays


def changed(now: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> set[str]:
    return {name for name in fresh if not np.array_equal(now[name], fresh[name])}


@pytest.mark.parametrize(("family", "part"), [(DAMPING, "damping x4"), (MASS, "torso mass x2")])
def test_scaled_families_reward_from_states_equals_env_reward(scaled, family, part):
    env = scaled[family.name]
    acts = actions(env, 40)
    obs, rewards, infos = rollout(env, Perturbation(part=family.parts.index(part)), acts)
    assert obs.shape == (41, 18) and obs[-1, 0] == env.data.qpos[0]
    predicted = family.reward(*(torch.from_numpy(x) for x in (obs[:-1], acts, obs[1:])), env.dt)
    assert predicted.dtype == torch.float64 and predicted.shape == (40,)
    np.testing.assert_allclose(predicted.numpy(), rewards, rtol=0, atol=1e-8)
    gym_rewards = np.array([i["env_reward"] for i in infos])
    np.testing.assert_allclose(gym_rewards, rewards, rtol=0, atol=1e-8)
    assert rewards.std() > 0.1


@pytest.mark.parametrize(("family", "base", "level"), SCALED)
def test_scaled_parameter_changes_the_dynamics_only_when_asked(scaled, family, base, level):
    env = scaled[family.name]
    acts = actions(env, 30, seed=3)
    intact, _, _ = rollout(env, Perturbation(), acts)
    assert np.array_equal(rollout(env, Perturbation(), acts)[0], intact)
    # x1 is the compiled model
    assert np.array_equal(
        rollout(env, Perturbation(part=family.parts.index(base)), acts)[0], intact
    )
    runs = {}
    for part, name in enumerate(family.parts):
        runs[name], _, infos = rollout(env, Perturbation(part=part), acts)
        assert all(i["part"] == part for i in infos)
        again, _, _ = rollout(env, Perturbation(part=part), acts)
        assert np.array_equal(again, runs[name])  # deterministic, and edits do not accumulate
        assert np.array_equal(runs[name][0], intact[0])  # the start state does not move
    for i, a in enumerate(family.parts):  # every level differs from every other
        for b in family.parts[i + 1 :]:
            assert np.abs(runs[a][1:] - runs[b][1:]).max() > 1e-3, (a, b)
    assert np.abs(runs[level][1:] - intact[1:]).max() > 1e-2


def test_damping_level_scales_the_six_joints(scaled):
    env, fresh = scaled["cheetah-damping"], every_model_array(DAMPING.make())
    assert np.array_equal(fresh["dof_damping"], [0, 0, 0, 6, 4.5, 3, 4.5, 3, 1.5])
    x8 = DAMPING.parts.index("damping x8")
    assert env.part_ids[x8] == PartEdits((Edit("dof_damping", (3, 4, 5, 6, 7, 8), 8.0),))
    rollout(env, Perturbation(part=x8), actions(env, 5))
    now = every_model_array(env)  # mid-episode
    assert np.array_equal(now["dof_damping"][3:], 8 * fresh["dof_damping"][3:])
    assert np.array_equal(now["dof_damping"][:3], np.zeros(3))  # the root's DoFs
    assert changed(now, fresh) == {"dof_damping"}
    quarter = DAMPING.parts.index("damping x0.25")
    env.reset(options={"perturbation": Perturbation(part=quarter)})
    assert np.array_equal(env.model.dof_damping, 0.25 * fresh["dof_damping"])


def test_mass_level_scales_the_torso_as_the_compiler_would(scaled):
    env, fresh = scaled["cheetah-mass"], every_model_array(MASS.make())
    torso = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_BODY, "torso")
    x3 = MASS.parts.index("torso mass x3")
    assert env.part_ids[x3].edits == (
        Edit("body_mass", (torso,), 3.0),
        Edit("body_inertia", (torso,), 3.0),
    )
    rollout(env, Perturbation(part=x3), actions(env, 5))
    now = every_model_array(env)  # mid-episode
    assert now["body_mass"][torso] == 3 * fresh["body_mass"][torso]
    assert np.array_equal(now["body_inertia"][torso], 3 * fresh["body_inertia"][torso])
    others = [b for b in range(env.model.nbody) if b != torso]
    for name in ("body_mass", "body_inertia"):
        assert np.array_equal(now[name][others], fresh[name][others])
    assert fresh["body_subtreemass"][0] == pytest.approx(14.0)
    assert now["body_subtreemass"][0] == pytest.approx(14.0 + 2 * fresh["body_mass"][torso])
    derived = {"body_subtreemass", "body_invweight0", "dof_invweight0", "stat.meaninertia"}
    assert derived <= changed(now, fresh)  # mj_setConst ran

    # The same model, compiled from the XML with the torso's inertial given explicitly
    spec = mujoco.MjSpec.from_file(env.unwrapped.fullpath)
    spec.compiler.settotalmass = -1  # the XML rescales the robot to 14 in all
    spec.compiler.inertiafromgeom = mujoco.mjtInertiaFromGeom.mjINERTIAFROMGEOM_FALSE
    for body in spec.bodies[1:]:
        b = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_BODY, body.name)
        body.explicitinertial = True
        body.mass, body.inertia = now["body_mass"][b], now["body_inertia"][b]
        body.ipos, body.iquat = fresh["body_ipos"][b], fresh["body_iquat"][b]
    compiled = spec.compile()
    for name, array in now.items():
        if not name.startswith("stat."):
            assert np.array_equal(array, getattr(compiled, name)), name
    for name in ("meaninertia", "meanmass"):
        assert now[f"stat.{name}"] == getattr(compiled.stat, name)


@pytest.mark.parametrize(("family", "base", "level"), SCALED)
def test_scaled_reset_restores_every_model_array(family, base, level):
    fresh_env = family.make()
    fresh = every_model_array(fresh_env)
    acts = actions(fresh_env, 20, seed=4)
    reference, _, _ = rollout(fresh_env, Perturbation(), acts, seed=5)
    env = family.make()
    first, second = family.parts.index(base), family.parts.index(level)
    rollout(env, Perturbation(part=first, switch_at=5, switch_to=second), acts)
    assert changed(every_model_array(env), fresh) >= {e.array for e in env.part_ids[second].edits}
    after, _, _ = rollout(env, Perturbation(), acts, seed=5)
    assert changed(every_model_array(env), fresh) == set()
    assert np.array_equal(after, reference)  # as a fresh env's
    rollout(env, Perturbation(part=second), acts)
    env.reset()  # no options: intact
    assert changed(every_model_array(env), fresh) == set()


@pytest.mark.parametrize(("family", "base", "level"), SCALED)
def test_scaled_mid_episode_switch(scaled, family, base, level):
    env, switch_at, steps = scaled[family.name], 10, 25
    first, second = family.parts.index(base), family.parts.index(level)
    switch = Perturbation(part=first, switch_at=switch_at, switch_to=second)
    acts = actions(env, steps, seed=6)
    switched, _, infos = rollout(env, switch, acts)
    assert [i["part"] for i in infos] == [first] * switch_at + [second] * (steps - switch_at)
    fresh = family.make().model
    for edit in env.part_ids[second].edits:  # the second level's values, after the episode
        rows = list(edit.ids)
        scaled_rows = edit.factor * getattr(fresh, edit.array)[rows]
        assert np.array_equal(getattr(env.model, edit.array)[rows], scaled_rows)
    unswitched, _, _ = rollout(env, Perturbation(part=first), acts)
    # obs[t] is the state before step t: equal up to the switch, different after
    assert np.array_equal(switched[: switch_at + 1], unswitched[: switch_at + 1])
    assert np.abs(switched[switch_at + 1] - unswitched[switch_at + 1]).max() > 1e-6
    # a switch to the same level (restore, edit, mj_setConst) leaves the state alone
    same = Perturbation(part=second, switch_at=switch_at, switch_to=second)
    assert np.array_equal(
        rollout(env, same, acts)[0], rollout(env, Perturbation(part=second), acts)[0]
    )


def test_scaled_family_names_and_levels():
    assert DAMPING.parts == tuple(f"damping x{f}" for f in ("0.25", "0.5", "1", "2", "4", "8"))
    assert MASS.parts == tuple(
        f"torso mass x{f}" for f in ("0.5", "0.75", "1", "1.25", "1.5", "2", "3")
    )
    assert DAMPING.test["unseen"].describe(DAMPING) == "damping x8"
    assert DAMPING.test["switch"].describe(DAMPING) == "damping x1 -> damping x8 at step 100"
    assert MASS.test["unseen"].describe(MASS) == "torso mass x3"
    assert MASS.test["switch"].describe(MASS) == "torso mass x1 -> torso mass x3 at step 100"
    assert (
        Perturbation(part=1, switch_at=4).describe(MASS) == "torso mass x0.75 -> intact at step 4"
    )
    assert Perturbation().describe(DAMPING) == "intact"
    for family in (DAMPING, MASS):
        factor = [float(name.rsplit("x", 1)[1]) for name in family.parts]
        train = [factor[p] for p in family.train_parts]
        assert 1.0 in train
        assert factor[family.test["unseen"].part] >= 2 * max(train)  # an extrapolation
        assert factor[family.test["switch"].part] == 1.0
        assert family.test["switch"].switch_to == family.test["unseen"].part
        assert family.env_kwargs == CHEETAH.env_kwargs and family.model_input == CHEETAH.model_input
    with pytest.raises(ConfigError, match="cheetah-joint, ant-leg, cheetah-damping, cheetah-mass"):
        get_task("nope")
    assert get_task("cheetah-mass") is MASS


def test_edits_name_restored_arrays_only(cheetah, ant):
    assert {"dof_damping", "body_mass", "body_inertia"} <= set(EDITED_ARRAYS)
    assert cheetah.part_ids[BFOOT].edits == (Edit("actuator_gear", (BFOOT,), 0.0),)
    gear, size, pos = ant.part_ids[3].edits
    assert (gear.array, gear.ids, gear.factor) == ("actuator_gear", (0, 1), 0.0)
    assert (size.array, pos.array, size.factor, pos.factor) == ("geom_size", "geom_pos", 0.5, 0.5)
    with pytest.raises(ValueError, match="body_pos.*EDITED_ARRAYS"):
        Edit("body_pos", (1,), 2.0)
