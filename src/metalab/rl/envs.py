"""Perturbed MuJoCo locomotion for GrBAL/ReBAL (Nagabandi, Clavera et al. 2019, "Learning to adapt in
dynamic, real-world environments"), ported from iclavera/learning_to_adapt to gymnasium v5.

Each rollout gets a :class:`Perturbation` at reset: one *part* of the robot is broken by editing the
compiled MuJoCo model at run time, and it may be switched to another part mid-episode. Two families:

``cheetah-joint``
    HalfCheetah-v5 (obs = qpos 9 + qvel 9 = 18 dims, ``obs[0]`` the absolute x). A part is one of
    the six actuators, looked up by name (``bthigh bshin bfoot fthigh fshin ffoot``). A *disabled
    joint* has its actuator's gear zeroed, so the action on it has no effect (it still pays the
    control cost, in the env and in :meth:`TaskFamily.reward` alike; the original masked the action
    instead, so it paid nothing). Train on bshin..fshin; test on ffoot ("unseen") and on bfoot
    switched to ffoot at step 100 ("switch").
``ant-leg``
    Ant-v5 (obs = qpos 15 + qvel 14 = 29 dims, ``obs[0:2]`` the absolute torso x, y; no contact
    forces). A part is a leg; a *crippled leg* has both its actuators' gears zeroed and its two
    jointed capsules halved (below). Train on legs 0-2; test on leg 3 ("unseen") and on leg 0
    switched to leg 3 at step 100 ("switch"). Legs, as found from the model (``x`` is forward):

    ====== ============== ===================================== ================================
    leg    joints         bodies (torso child, hip, ankle)      crippled geoms
    ====== ============== ===================================== ================================
    leg 0  hip_1 ankle_1  front_left_leg, aux_1, (unnamed)      left_leg_geom, left_ankle_geom
    leg 1  hip_2 ankle_2  front_right_leg, aux_2, (unnamed)     right_leg_geom, right_ankle_geom
    leg 2  hip_3 ankle_3  back_leg, aux_3, (unnamed)            back_leg_geom, third_ankle_geom
    leg 3  hip_4 ankle_4  right_back_leg, aux_4, (unnamed)      rightback_leg_geom,
                                                                fourth_ankle_geom
    ====== ============== ===================================== ================================

    Leg 0 sits at (+x, +y), leg 1 at (-x, +y), leg 2 at (-x, -y), leg 3 at (+x, -y) (the XML names
    say otherwise). In Ant-v5 the actuators are unnamed and ordered hip_4, ankle_4, hip_1, ... so
    leg 3 drives actions 0-1 and leg k < 3 actions 2k+2, 2k+3, as in the original. The leg's geoms
    are those on the bodies its joints move (the hip body and its descendants); the short
    ``aux_k_geom`` on the torso-fixed ``*_leg`` body is left intact, as in the original.

    Halving a geom: ``geom_size`` (capsule radius, half-length) and ``geom_pos`` (capsule centre in
    its body's frame) are both multiplied by 0.5. Each of these capsules starts at its body's origin
    (the joint), so the halved one still starts at the joint and spans the first half of the old
    segment: the foot is exactly the original's (which moved its centre to the thigh's centre,
    the same point), the thigh's centre is 0.05 nearer the hip in x and y than the original's
    (which kept it at the segment's middle). Masses and inertias are not recomputed (as in the original), nor ``geom_rbound``
    and ``geom_aabb`` (still bounding the smaller geom, so collision detection stays exact).

Rewards are computed by :class:`PerturbedEnv` from the observations alone, exactly as
:meth:`TaskFamily.reward` does for MPC on predicted states: ``(next_obs[0] - obs[0]) / dt -
ctrl_cost * |action|^2 + alive_bonus``. For HalfCheetah-v5 this is gymnasium's own reward. For
Ant-v5 gymnasium's differs: it takes the x velocity from ``data.body("torso").xpos``, which after
``mj_step`` is one physics substep behind ``qpos``, and it drops the 0.05 bonus when the torso
leaves z in [0.2, 1]; gymnasium's value stays in ``info["env_reward"]``. The original's alive bonus
was unconditional too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
import torch

from metalab.errors import ConfigError

#: Compiled-model arrays that perturbations edit; restored from a copy before each perturbation.
EDITED_ARRAYS = ("actuator_gear", "geom_size", "geom_pos")


@dataclass(frozen=True)
class Perturbation:
    """What is broken in one rollout. part: index of the disabled joint / crippled leg, or None
    (intact). switch_at: env step (counted from 0) at which part changes to switch_to (None:
    intact), or None for no switch."""

    part: int | None = None
    switch_at: int | None = None
    switch_to: int | None = None

    def __post_init__(self) -> None:
        if self.switch_at is not None and self.switch_at < 0:
            raise ConfigError(f"switch_at={self.switch_at}: use a step >= 0, or None")
        if self.switch_at is None and self.switch_to is not None:
            raise ConfigError(f"switch_to={self.switch_to} without switch_at: give both")

    def part_at(self, step: int) -> int | None:
        """The part in force during env step ``step`` (counted from 0)."""
        if self.switch_at is not None and step >= self.switch_at:
            return self.switch_to
        return self.part

    def describe(self, family: TaskFamily) -> str:
        """E.g. "ffoot disabled", "bfoot -> ffoot at step 100", "leg 3 crippled", "intact"."""

        def name(part: int | None) -> str:
            return "intact" if part is None else family.parts[part]

        if self.switch_at is not None:
            return f"{name(self.part)} -> {name(self.switch_to)} at step {self.switch_at}"
        return "intact" if self.part is None else f"{name(self.part)} {family.damage}"


@dataclass(frozen=True)
class PartIds:
    """Where one perturbable part lives in a compiled model: the actuators whose gear is zeroed and
    the geoms that are halved (none for a disabled joint)."""

    actuators: tuple[int, ...]
    geoms: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskFamily:
    """A distribution of perturbed locomotion tasks over one gymnasium MuJoCo env.

    ``test`` holds the named single-perturbation test conditions ("unseen", "switch"); "seen"
    (the training parts in turn) comes from :meth:`test_conditions`. ``model_input`` selects the obs
    dims a dynamics model sees (all but the absolute position). ``locate`` finds the parts in the
    compiled model; ``damage`` names a broken part in :meth:`Perturbation.describe`.
    """

    name: str
    env_id: str
    parts: tuple[str, ...]
    train_parts: tuple[int, ...]
    test: dict[str, Perturbation] = field(hash=False)
    ctrl_cost: float
    alive_bonus: float
    model_input: slice = field(hash=False)
    locate: Callable[[Any], tuple[PartIds, ...]] = field(repr=False, compare=False, hash=False)
    damage: str = "disabled"
    env_kwargs: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)

    def make(self, frame_skip: int = 5, seed: int | None = None) -> PerturbedEnv:
        """A fresh env, without a time limit (callers decide the episode length); ``seed`` seeds its
        first reset that gives no seed, and its action space."""
        env = gym.make(self.env_id, frame_skip=frame_skip, **self.env_kwargs).unwrapped
        return PerturbedEnv(env, self, seed=seed)

    def sample_train(self, rng: np.random.Generator) -> Perturbation:
        """A training perturbation: one of ``train_parts``, uniformly, fixed for the rollout."""
        return Perturbation(part=self.train_parts[int(rng.integers(len(self.train_parts)))])

    def test_conditions(
        self, rollouts: int, episode_steps: int | None = None
    ) -> list[tuple[str, Perturbation]]:
        """``rollouts`` (condition, perturbation) pairs for each of "seen" (cycling through
        ``train_parts``) and then each entry of ``test`` in order; deterministic. With
        ``episode_steps``, a mid-episode switch happens halfway through the episode."""
        if rollouts < 1:
            raise ConfigError(f"rollouts={rollouts}: use at least 1 rollout per test condition")
        seen = [
            ("seen", Perturbation(part=self.train_parts[i % len(self.train_parts)]))
            for i in range(rollouts)
        ]
        test = dict(self.test)
        if episode_steps is not None:
            test = {
                name: p if p.switch_at is None else replace(p, switch_at=episode_steps // 2)
                for name, p in test.items()
            }
        return seen + [(name, p) for name, p in test.items() for _ in range(rollouts)]

    def reward(
        self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor, dt: float
    ) -> torch.Tensor:
        """The env's reward from states alone, batched over leading dims: forward velocity of the
        absolute x minus the control cost plus the alive bonus."""
        forward = (next_obs[..., 0] - obs[..., 0]) / dt
        return forward - self.ctrl_cost * (action**2).sum(-1) + self.alive_bonus

    def check(self, perturbation: Perturbation) -> None:
        """Raise ConfigError unless every part the perturbation names is one of ``parts``."""
        for part in (perturbation.part, perturbation.switch_to):
            if part is not None and not 0 <= part < len(self.parts):
                raise ConfigError(
                    f"part={part}: {self.name} has parts 0..{len(self.parts) - 1} "
                    f"({', '.join(self.parts)}), or None for intact"
                )


class PerturbedEnv(gym.Wrapper):
    """A gymnasium MuJoCo env whose compiled model is edited at reset (and at ``switch_at``).

    ``reset(options={"perturbation": Perturbation(...)})`` restores :data:`EDITED_ARRAYS` to the
    compiled values, breaks the part and resets the state (default: intact). ``step`` returns the
    family's reward (see the module docstring) and adds to info: ``part`` (in force for this step),
    ``step`` (its index) and ``env_reward`` (gymnasium's own reward).
    """

    def __init__(self, env: gym.Env, family: TaskFamily, seed: int | None = None) -> None:
        super().__init__(env)
        base = env.unwrapped
        self.family = family
        self.dt: float = float(base.dt)
        self.model = base.model
        self.data = base.data
        self.part_ids: tuple[PartIds, ...] = family.locate(self.model)
        self._original = {name: getattr(self.model, name).copy() for name in EDITED_ARRAYS}
        self.perturbation = Perturbation()
        self.part: int | None = None
        self.steps = 0
        self._seed = seed
        self._needs_reset = True
        if seed is not None:
            self.action_space.seed(seed)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Restore the model, apply ``options["perturbation"]`` and reset the state."""
        options = dict(options or {})
        perturbation = options.pop("perturbation", Perturbation())
        if not isinstance(perturbation, Perturbation):
            raise ConfigError(f"perturbation={perturbation!r}: pass a Perturbation")
        self.family.check(perturbation)
        if seed is None:
            seed, self._seed = self._seed, None
        self.perturbation, self.steps, self._needs_reset = perturbation, 0, False
        self._set_part(perturbation.part)
        obs, info = self.env.reset(seed=seed, options=options or None)
        return obs, {**info, "perturbation": perturbation, "part": self.part}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One env step; at step ``switch_at`` the part switches before the physics runs."""
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        if self.steps == self.perturbation.switch_at:
            self._set_part(self.perturbation.switch_to)
        x_before = float(self.data.qpos[0])
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        action = np.asarray(action, dtype=np.float64)
        reward = (
            (float(obs[0]) - x_before) / self.dt
            - self.family.ctrl_cost * float(np.sum(np.square(action)))
            + self.family.alive_bonus
        )
        info = {**info, "part": self.part, "step": self.steps, "env_reward": float(env_reward)}
        self.steps += 1
        return obs, reward, terminated, truncated, info

    def _set_part(self, part: int | None) -> None:
        """Restore the edited arrays, then break ``part`` (None: leave intact)."""
        for name, original in self._original.items():
            np.copyto(getattr(self.model, name), original)
        self.part = part
        if part is None:
            return
        ids = self.part_ids[part]
        # Joint transmissions use gear[0] only; the whole row is zeroed.
        self.model.actuator_gear[list(ids.actuators)] = 0.0
        if ids.geoms:
            self.model.geom_size[list(ids.geoms)] *= 0.5
            self.model.geom_pos[list(ids.geoms)] *= 0.5


def _name2id(model: Any, kind: mujoco.mjtObj, name: str) -> int:
    index = mujoco.mj_name2id(model, kind, name)
    if index < 0:
        raise RuntimeError(f"no {kind.name} named {name!r} in the model: a different XML?")
    return index


_CHEETAH_PARTS = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")


def _locate_cheetah(model: Any) -> tuple[PartIds, ...]:
    """HalfCheetah: each part is the actuator of that name."""
    return tuple(
        PartIds((_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, name),)) for name in _CHEETAH_PARTS
    )


def _locate_ant(model: Any) -> tuple[PartIds, ...]:
    """Ant: leg k is driven by joints hip_{k+1} and ankle_{k+1}; its geoms are those on the hip's
    body and its descendants (see the module docstring)."""
    legs = []
    for k in range(4):
        joints = [
            _name2id(model, mujoco.mjtObj.mjOBJ_JOINT, f"{j}_{k + 1}") for j in ("hip", "ankle")
        ]
        actuators = tuple(
            int(a)
            for a in range(model.nu)
            if model.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_JOINT
            and int(model.actuator_trnid[a, 0]) in joints
        )
        hip_body = int(model.jnt_bodyid[joints[0]])
        bodies = {hip_body}
        for b in range(hip_body + 1, model.nbody):  # MuJoCo numbers children after parents
            if int(model.body_parentid[b]) in bodies:
                bodies.add(b)
        geoms = tuple(g for g in range(model.ngeom) if int(model.geom_bodyid[g]) in bodies)
        if len(actuators) != 2 or len(geoms) != 2:
            raise RuntimeError(f"leg {k}: found actuators {actuators}, geoms {geoms}; expected 2+2")
        legs.append(PartIds(actuators, geoms))
    return tuple(legs)


TASKS: dict[str, TaskFamily] = {
    "cheetah-joint": TaskFamily(
        name="cheetah-joint",
        env_id="HalfCheetah-v5",
        parts=_CHEETAH_PARTS,
        train_parts=(1, 2, 3, 4),
        test={
            "unseen": Perturbation(part=5),
            "switch": Perturbation(part=2, switch_at=100, switch_to=5),
        },
        ctrl_cost=0.05,
        alive_bonus=0.0,
        model_input=slice(1, None),
        locate=_locate_cheetah,
        damage="disabled",
        env_kwargs={
            "ctrl_cost_weight": 0.05,
            "forward_reward_weight": 1.0,
            "exclude_current_positions_from_observation": False,
        },
    ),
    "ant-leg": TaskFamily(
        name="ant-leg",
        env_id="Ant-v5",
        parts=("leg 0", "leg 1", "leg 2", "leg 3"),
        train_parts=(0, 1, 2),
        test={
            "unseen": Perturbation(part=3),
            "switch": Perturbation(part=0, switch_at=100, switch_to=3),
        },
        ctrl_cost=0.0,
        alive_bonus=0.05,
        model_input=slice(2, None),
        locate=_locate_ant,
        damage="crippled",
        env_kwargs={
            "exclude_current_positions_from_observation": False,
            "include_cfrc_ext_in_observation": False,
            "ctrl_cost_weight": 0.0,
            "contact_cost_weight": 0.0,
            "healthy_reward": 0.05,
            "terminate_when_unhealthy": False,
        },
    ),
}


def get_task(name: str) -> TaskFamily:
    """The task family called ``name``; ConfigError naming the valid ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown RL task family {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]
