"""Perturbed MuJoCo locomotion for GrBAL/ReBAL (Nagabandi, Clavera et al. 2019, "Learning to adapt in
dynamic, real-world environments"), ported from iclavera/learning_to_adapt to gymnasium v5.

Each rollout gets a :class:`Perturbation` at reset: one *part* of the robot is broken, or one level
of a physical parameter is set, by editing the compiled MuJoCo model at run time, and it may be
switched to another part mid-episode. A part is a tuple of :class:`Edit` (rows of a model array
multiplied by a factor); every array in :data:`EDITED_ARRAYS` is restored from a copy before each
perturbation. Four families:

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
    (which kept it at the segment's middle). Masses and inertias are not recomputed (as in the
    original), nor ``geom_rbound`` and ``geom_aabb`` (still bounding the smaller geom, so collision
    detection stays exact).
``cheetah-damping``
    HalfCheetah-v5 as in ``cheetah-joint`` (same obs, env kwargs and reward). A part is a level: the
    ``dof_damping`` of the six actuated joints multiplied by 0.25, 0.5, 1, 2, 4 or 8 (named
    ``damping x0.25`` ... ``damping x8``); the root's three DoFs (rootx, rootz, rooty) have none and
    are left alone. The compiled values are bthigh 6, bshin 4.5, bfoot 3, fthigh 4.5, fshin 3,
    ffoot 1.5 (armature 0.1 each, unchanged). The default Euler integrator treats damping implicitly
    and reads ``dof_damping`` at every step, so the edit needs nothing else. Train on x0.5, x1, x2;
    test on x8 ("unseen", an extrapolation 4x beyond the training range) and on x1 switched to x8
    at step 100 ("switch").
``cheetah-mass``
    HalfCheetah-v5 as in ``cheetah-joint``. A part is a level: the torso's ``body_mass`` and
    ``body_inertia`` (a uniformly denser torso) multiplied by 0.5, 0.75, 1, 1.25, 1.5, 2 or 3
    (named ``torso mass x0.5`` ...). The compiled torso (capsule and head) has mass 6.2502 of the
    robot's 14.0 and principal inertia (0.8971, 0.8857, 0.0180). Train on x0.75, x1, x1.25, x1.5;
    test on x3 ("unseen", 2x the heaviest training torso) and on x1 switched to x3 at step 100
    ("switch"). The dynamics (composite rigid body, RNE) read ``body_mass`` and ``body_inertia`` at
    every step, so a direct edit changes them; but the compiler also derives constants from them
    (``body_subtreemass``, ``body_invweight0`` and ``dof_invweight0``, which set the softness of
    contacts and joint limits, ``stat.meaninertia``, which scales the solver's tolerance,
    ``dof_M0``, ``actuator_acc0``, ``cam_poscom0``, ``light_poscom0``). After an edit of an array in
    :data:`SET_CONST_ARRAYS`, and after restoring it, :class:`PerturbedEnv` therefore calls
    ``mujoco.mj_setConst`` (on a scratch ``MjData``: it overwrites the state of the one it gets), so
    the model is the one the compiler would give for that torso; on the restored arrays it gives
    back the compiled constants bit for bit.

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
EDITED_ARRAYS = (
    "actuator_gear",
    "geom_size",
    "geom_pos",
    "dof_damping",
    "body_mass",
    "body_inertia",
)
#: Edited arrays from which ``mujoco.mj_setConst`` derives other model constants: it runs after
#: they are edited or restored (see ``cheetah-mass`` in the module docstring).
SET_CONST_ARRAYS = ("body_mass", "body_inertia")


@dataclass(frozen=True)
class Perturbation:
    """What is broken in one rollout. part: index into the family's ``parts`` (the disabled joint,
    crippled leg, damping or mass level), or None (intact). switch_at: env step (counted from 0) at
    which part changes to switch_to (None: intact), or None for no switch."""

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
        """E.g. "ffoot disabled", "bfoot -> ffoot at step 100", "leg 3 crippled", "damping x8",
        "damping x1 -> damping x8 at step 100", "intact"."""

        def name(part: int | None) -> str:
            return "intact" if part is None else family.parts[part]

        if self.switch_at is not None:
            return f"{name(self.part)} -> {name(self.switch_to)} at step {self.switch_at}"
        if self.part is None:
            return "intact"
        return f"{name(self.part)} {family.damage}" if family.damage else name(self.part)


@dataclass(frozen=True)
class Edit:
    """One run-time edit of the compiled model: rows ``ids`` of ``model.<array>`` (one of
    :data:`EDITED_ARRAYS`) multiplied by ``factor``."""

    array: str
    ids: tuple[int, ...]
    factor: float

    def __post_init__(self) -> None:
        if self.array not in EDITED_ARRAYS:
            raise ValueError(
                f"array={self.array!r}: reset restores only {', '.join(EDITED_ARRAYS)}; "
                "add it to EDITED_ARRAYS"
            )

    def apply(self, model: Any) -> None:
        """Multiply the rows in place."""
        array = getattr(model, self.array)
        array[list(self.ids)] *= self.factor


@dataclass(frozen=True)
class PartIds:
    """Where one perturbable part lives in a compiled model: the actuators whose gear is zeroed and
    the geoms that are halved (none for a disabled joint)."""

    actuators: tuple[int, ...]
    geoms: tuple[int, ...] = ()

    @property
    def edits(self) -> tuple[Edit, ...]:
        """The part's edits: gear x0 (the whole row: joint transmissions use gear[0] only), and
        geom size and position x0.5."""
        gear = (Edit("actuator_gear", self.actuators, 0.0),)
        if not self.geoms:
            return gear
        return (*gear, Edit("geom_size", self.geoms, 0.5), Edit("geom_pos", self.geoms, 0.5))


@dataclass(frozen=True)
class PartEdits:
    """A perturbable part given directly as its model edits (e.g. one damping or mass level)."""

    edits: tuple[Edit, ...]


@dataclass(frozen=True)
class TaskFamily:
    """A distribution of perturbed locomotion tasks over one gymnasium MuJoCo env.

    ``test`` holds the named single-perturbation test conditions ("unseen", "switch"); "seen"
    (the training parts in turn) comes from :meth:`test_conditions`. ``model_input`` selects the obs
    dims a dynamics model sees (all but the absolute position). ``locate`` finds the parts in the
    compiled model (each with its :class:`Edit` tuple); ``damage`` follows a part's name in
    :meth:`Perturbation.describe` ("" for parts whose names already read as a condition, such as
    "damping x8").
    """

    name: str
    env_id: str
    parts: tuple[str, ...]
    train_parts: tuple[int, ...]
    test: dict[str, Perturbation] = field(hash=False)
    ctrl_cost: float
    alive_bonus: float
    model_input: slice = field(hash=False)
    locate: Callable[[Any], tuple[PartIds | PartEdits, ...]] = field(
        repr=False, compare=False, hash=False
    )
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
    compiled values, applies the part's edits and resets the state (default: intact). ``step``
    returns the family's reward (see the module docstring) and adds to info: ``part`` (in force for
    this step), ``step`` (its index) and ``env_reward`` (gymnasium's own reward).
    """

    def __init__(self, env: gym.Env, family: TaskFamily, seed: int | None = None) -> None:
        super().__init__(env)
        base = env.unwrapped
        self.family = family
        self.dt: float = float(base.dt)
        self.model = base.model
        self.data = base.data
        self.part_ids: tuple[PartIds | PartEdits, ...] = family.locate(self.model)
        self._original = {name: getattr(self.model, name).copy() for name in EDITED_ARRAYS}
        self._const_stale = False  # derived constants computed from edited SET_CONST_ARRAYS
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
        """Restore the edited arrays, then apply ``part``'s edits (None: leave intact); recompute
        the model's derived constants when a :data:`SET_CONST_ARRAYS` array was or is edited."""
        for name, original in self._original.items():
            np.copyto(getattr(self.model, name), original)
        self.part = part
        edits = () if part is None else self.part_ids[part].edits
        for edit in edits:
            edit.apply(self.model)
        stale = any(edit.array in SET_CONST_ARRAYS for edit in edits)
        if stale or self._const_stale:
            # on a scratch MjData: mj_setConst overwrites the state of the one it gets
            mujoco.mj_setConst(self.model, mujoco.MjData(self.model))
        self._const_stale = stale


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


_CHEETAH_DAMPING = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_CHEETAH_MASS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def _locate_cheetah_damping(model: Any) -> tuple[PartEdits, ...]:
    """HalfCheetah: level k scales the damping of the six actuated joints' DoFs."""
    joints = [_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name) for name in _CHEETAH_PARTS]
    dofs = tuple(int(model.jnt_dofadr[j]) for j in joints)
    return tuple(PartEdits((Edit("dof_damping", dofs, f),)) for f in _CHEETAH_DAMPING)


def _locate_cheetah_mass(model: Any) -> tuple[PartEdits, ...]:
    """HalfCheetah: level k scales the torso's mass and inertia."""
    torso = (_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "torso"),)
    return tuple(
        PartEdits((Edit("body_mass", torso, f), Edit("body_inertia", torso, f)))
        for f in _CHEETAH_MASS
    )


def _cheetah_env_kwargs() -> dict[str, Any]:
    return {
        "ctrl_cost_weight": 0.05,
        "forward_reward_weight": 1.0,
        "exclude_current_positions_from_observation": False,
    }


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
        env_kwargs=_cheetah_env_kwargs(),
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
    "cheetah-damping": TaskFamily(
        name="cheetah-damping",
        env_id="HalfCheetah-v5",
        parts=tuple(f"damping x{f:g}" for f in _CHEETAH_DAMPING),
        train_parts=(1, 2, 3),
        test={
            "unseen": Perturbation(part=5),
            "switch": Perturbation(part=2, switch_at=100, switch_to=5),
        },
        ctrl_cost=0.05,
        alive_bonus=0.0,
        model_input=slice(1, None),
        locate=_locate_cheetah_damping,
        damage="",
        env_kwargs=_cheetah_env_kwargs(),
    ),
    "cheetah-mass": TaskFamily(
        name="cheetah-mass",
        env_id="HalfCheetah-v5",
        parts=tuple(f"torso mass x{f:g}" for f in _CHEETAH_MASS),
        train_parts=(1, 2, 3, 4),
        test={
            "unseen": Perturbation(part=6),
            "switch": Perturbation(part=2, switch_at=100, switch_to=6),
        },
        ctrl_cost=0.05,
        alive_bonus=0.0,
        model_input=slice(1, None),
        locate=_locate_cheetah_mass,
        damage="",
        env_kwargs=_cheetah_env_kwargs(),
    ),
}


def get_task(name: str) -> TaskFamily:
    """The task family called ``name``; ConfigError naming the valid ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown RL task family {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]
