"""The task distributions of the PEARL suite (Rakelly et al. 2019, "Efficient off-policy
meta-reinforcement learning via probabilistic context variables"), on which Meta-Q-Learning is
evaluated (Fakoor et al. 2020), ported from the rlkit envs of the official code (katerakelly/oyster,
copied into amazon-science/meta-q-learning; mujoco-py 1.31) to gymnasium v5 MuJoCo envs.

A *task* (:class:`GoalTask`) is a goal or a reward or physics parameter. A :class:`GoalFamily` holds
a fixed list of them and makes :class:`GoalEnv` wrappers, whose task is set at reset.

Common to every family:

Task lists
    Drawn once, at import, from ``np.random.RandomState(1337)`` (the legacy generator, whose stream
    numpy keeps fixed across versions and machines), with rlkit's calls in rlkit's order, all of a
    family's tasks in one draw; the train tasks are the first ``n_train`` of that list and the test
    tasks its last ``n_test`` (rlkit's ``tasks[:n_train]`` and ``tasks[-n_eval:]``). rlkit seeded
    1337 for cheetah-vel and point-robot, so those two lists are rlkit's own; it drew the others from
    an unseeded global generator. cheetah-dir and ant-dir have two fixed tasks, which are both the
    train and the test tasks (as in PEARL).
Episodes
    At most 200 steps (MQL's ``max_path_length``): ``truncated`` is True at step 200. ``terminated``
    as below, per family, following what each rlkit env returned as ``done``.
Actions
    Clipped to the action box before the env and the control costs see them (rlkit's
    ``NormalizedBoxEnv`` clipped them too).
Rewards
    The family's formula (below), from gymnasium's own step info (velocities, positions, contact
    and alive terms) and the clipped action, in float64; ``info["env_reward"]`` keeps gymnasium's
    reward and ``info["task"]`` the task's index.

The families (``a`` the clipped action, ``v`` the forward velocity, ``c`` the contact cost):

``point-robot`` (80 train / 20 test)
    No MuJoCo: :class:`PointRobot`, a point on the plane, observation = position (float32), action
    box +-0.1 added to the position, start at the origin, reward ``-|s - g|_2`` after the move,
    never terminates. Goals U[-1, 1]^2 (rlkit's list). rlkit's dense ``PointEnv`` started each
    episode uniformly in [-1, 1]^2 (its sparse variant at the origin) and PEARL ran 20 steps.
``cheetah-vel`` (100 / 30)
    HalfCheetah-v5 with the absolute x kept (obs 18 dims, ``obs[0]`` = x; rlkit's obs held the
    torso's centre of mass, x included), so ``v = (next_obs[0] - obs[0]) / dt`` = gymnasium's
    ``x_velocity``. Reward ``-|v - v*| - 0.05 |a|^2``, v* ~ U[0, 3] (rlkit's list). Never terminates.
``cheetah-dir`` (2 / 2, the same two)
    As cheetah-vel; reward ``d v - 0.05 |a|^2``, d = -1, +1 (rlkit's order).
``ant-dir`` (2 / 2, the same two)
    Ant-v5, obs qpos[2:] + qvel (27 dims, rlkit's ``AntEnv`` obs: no x, y, no contact forces).
    Reward ``d v - 0.5 |a|^2 - c + 1``, d = +1, -1 (rlkit's goal angles 0, pi, in that order), v
    gymnasium's ``x_velocity`` (torso ``xpos`` difference over dt, rlkit's ``get_body_com``), c
    gymnasium's contact cost ``5e-4 sum(clip(cfrc_ext, -1, 1)^2)`` (rlkit's 0.5e-3) and the survive
    bonus 1 unconditional, as rlkit's (gymnasium's is 0 on an unhealthy step). Terminates when
    unhealthy (a non-finite state or torso z outside [0.2, 1]): rlkit's ``AntDirEnv`` returned
    exactly this ``done`` and PEARL's and MQL's samplers stopped on it.
``ant-goal`` (150 / 30)
    Ant-v5, obs qpos (x, y kept) + qvel + clipped contact forces (107 dims; rlkit's 113 also held the
    world body's row, always zero). Reward ``-|xy - g|_1 - 0.1 |a|^2 - c`` (no survive bonus), xy the
    torso's qpos[0:2] after the step, that is ``next_obs[0:2]`` (rlkit read the torso's ``xpos``,
    which after ``mj_step`` is one physics substep, 0.01 s, behind qpos). Goals at angle 2 pi U and
    radius 3 sqrt(U) (all angles drawn, then all radii, as rlkit). Never terminates (rlkit's done was
    always False).
``humanoid-dir`` (100 / 30)
    Humanoid-v5, default obs (348 dims, no x, y; rlkit's 376 also held the world body's rows).
    Reward ``0.25 (u . dcom) / opt.timestep + reward_ctrl + reward_contact + reward_survive``, u =
    (cos t, sin t), t ~ U[0, 2 pi], dcom the step's centre-of-mass displacement, the last three
    Humanoid-v5's own: ``-0.1 |ctrl|^2``, the impact cost ``-min(5e-7 |cfrc_ext|^2, 10)`` and the
    alive bonus 5 while healthy (rlkit's 5 also on the terminal step). rlkit divided by
    ``opt.timestep``, not dt, like old gym's humanoid: that is ``1.25 u . velocity`` (frame_skip 5),
    Humanoid-v5's own forward weight. Terminates when torso z leaves (1, 2), as rlkit.
``walker-rand-params`` (40 / 10)
    Walker2d-v5 (frame_skip 4 as MQL's ``rand_param_envs``; obs qpos[1:] + clip(qvel, +-10), the
    same as theirs) and its own reward ``v + 1 - 1e-3 |a|^2`` and termination (unhealthy: z outside
    (0.8, 2) or angle outside (-1, 1)), all as rand_param_envs. A task is a set of multipliers, one
    per element, drawn like ``RandomEnv.sample_tasks``: ``body_mass``, ``body_inertia`` and
    ``geom_friction`` times 1.5^U[-3, 3], ``dof_damping`` times 1.3^U[-3, 3]. At each reset the
    compiled arrays are restored and multiplied, then ``mujoco.mj_setConst`` recomputes the
    constants the compiler derives from masses and inertias (mujoco-py 0.5 left them stale), on a
    scratch ``MjData``. Walker2d-v5's XML gives both feet friction 0.9 (the old walker2d.xml gave
    the left foot 1.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from metalab.errors import ConfigError

SEED = 1337  #: every family's task list is drawn from RandomState(SEED) (rlkit's cheetah-vel seed)
MAX_STEPS = 200  #: MQL's max_path_length

#: walker-rand-params: the model arrays a task multiplies, in rand_param_envs' draw order, with the
#: base b of the multiplier b^U[-3, 3], and their shapes in Walker2d-v5 (checked at every reset).
RAND_PARAMS = {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}
WALKER_SHAPES = {
    "body_mass": (8,),
    "body_inertia": (8, 3),
    "dof_damping": (9,),
    "geom_friction": (8, 3),
}
LOG_SCALE_LIMIT = 3.0


@dataclass(frozen=True)
class GoalTask:
    """One task of a family. index: its position in the family's full list (train tasks, then
    test tasks). params: JSON-serialisable, one of ``{"velocity": v}``, ``{"direction": +-1}``,
    ``{"angle": radians}``, ``{"goal": (x, y)}``, ``{"scales": {array: nested list}}``. Hashed by
    family and index."""

    family: str
    index: int
    params: dict[str, Any] = field(hash=False)

    def describe(self) -> str:
        """E.g. "velocity 1.37", "direction -1", "angle 4.12 rad", "goal (0.51, -2.03)",
        "random params 12 (masses x0.34-x2.87)"."""
        p = self.params
        if "velocity" in p:
            return f"velocity {p['velocity']:.2f}"
        if "direction" in p:
            return f"direction {p['direction']:+d}"
        if "angle" in p:
            return f"angle {p['angle']:.2f} rad"
        if "goal" in p:
            return f"goal ({p['goal'][0]:.2f}, {p['goal'][1]:.2f})"
        if "scales" in p:
            mass = np.asarray(p["scales"]["body_mass"])[1:]  # body 0 is the world
            return f"random params {self.index} (masses x{mass.min():.2f}-x{mass.max():.2f})"
        return repr(p)


#: A family's reward: (task, clipped float64 action, gymnasium's step info, unwrapped env) -> float.
RewardFn = Callable[[GoalTask, np.ndarray, dict[str, Any], Any], float]


@dataclass(frozen=True)
class GoalFamily:
    """A fixed list of tasks over one env. ``reward``: the family's formula (None: the env's own);
    ``env_kwargs``: for ``gymnasium.make``; ``wrapper``: the :class:`GoalEnv` subclass for tasks
    that change the env itself (None: plain :class:`GoalEnv`, the task is only in the reward)."""

    name: str
    env_id: str | None
    train_tasks: tuple[GoalTask, ...]
    test_tasks: tuple[GoalTask, ...]
    max_steps: int = MAX_STEPS
    reward: RewardFn | None = field(default=None, repr=False, compare=False)
    env_kwargs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    wrapper: type[GoalEnv] | None = field(default=None, repr=False, compare=False)

    @property
    def tasks(self) -> tuple[GoalTask, ...]:
        """The full list, by index (cheetah-dir, ant-dir: the two tasks once)."""
        unique = {t.index: t for t in (*self.train_tasks, *self.test_tasks)}
        return tuple(unique[i] for i in sorted(unique))

    def make(self, seed: int | None = None) -> GoalEnv:
        """A fresh env (task: ``train_tasks[0]`` until set); ``seed`` seeds its first reset that
        gives no seed, and its action space."""
        if self.env_id is None:
            env: gym.Env = PointRobot()
        else:
            env = gym.make(self.env_id, **self.env_kwargs).unwrapped
        return (self.wrapper or GoalEnv)(env, self, seed=seed)


class PointRobot(gym.Env):
    """rlkit's ``PointEnv``: a point on the plane; the action (clipped to +-0.1) is added to the
    position, the reward is minus the distance to ``goal`` after the move. Starts at the origin;
    never terminates (no time limit either: :class:`GoalEnv` truncates)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, goal: tuple[float, float] = (0.0, 0.0)) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-0.1, 0.1, shape=(2,), dtype=np.float32)
        self.goal = np.asarray(goal, dtype=np.float64)
        self.position = np.zeros(2)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = np.zeros(2)
        return self.position.astype(np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        low, high = self.action_space.low, self.action_space.high
        self.position = self.position + np.clip(np.asarray(action, dtype=np.float64), low, high)
        distance = float(np.linalg.norm(self.position - self.goal))
        return self.position.astype(np.float32), -distance, False, False, {"distance": distance}


class GoalEnv(gym.Wrapper):
    """An env of one :class:`GoalFamily`, posing one task per episode.

    ``set_task`` (or ``reset(options={"task": ...})``) takes effect at the next reset. ``step``
    clips the action to the box, returns the family's reward, truncates at ``family.max_steps``
    and adds ``task`` (the index) and ``env_reward`` (the inner env's reward) to info; ``reset``
    adds ``task``. Stepping before the first reset or after the episode ended raises.
    """

    def __init__(self, env: gym.Env, family: GoalFamily, seed: int | None = None) -> None:
        super().__init__(env)
        self.family = family
        self.task: GoalTask = family.train_tasks[0]
        self._next_task = self.task
        self.steps = 0
        self._seed = seed
        self._done = True  # no episode under way
        self._low = np.asarray(self.action_space.low, dtype=np.float64)
        self._high = np.asarray(self.action_space.high, dtype=np.float64)
        if seed is not None:
            self.action_space.seed(seed)

    def set_task(self, task: GoalTask) -> None:
        """Pose ``task`` from the next reset on."""
        if not isinstance(task, GoalTask) or task.family != self.family.name:
            raise ConfigError(f"task={task!r}: pass a GoalTask of family {self.family.name!r}")
        self._next_task = task

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode of the pending task (``options["task"]`` sets it first)."""
        options = dict(options or {})
        if "task" in options:
            self.set_task(options.pop("task"))
        if seed is None:
            seed, self._seed = self._seed, None
        self.task, self.steps, self._done = self._next_task, 0, False
        self._pose(self.task)
        obs, info = self.env.reset(seed=seed, options=options or None)
        return obs, {**info, "task": self.task.index}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("no episode under way: call reset() first")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self._low.shape:
            raise ValueError(f"action of shape {action.shape}: expected {self._low.shape}")
        action = np.clip(action, self._low, self._high)
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        if self.family.reward is None:
            reward = float(env_reward)
        else:
            reward = float(self.family.reward(self.task, action, info, self.env.unwrapped))
        self.steps += 1
        terminated = bool(terminated)
        truncated = bool(truncated) or self.steps >= self.family.max_steps
        self._done = terminated or truncated
        info = {**info, "task": self.task.index, "env_reward": float(env_reward)}
        return obs, reward, terminated, truncated, info

    def _pose(self, task: GoalTask) -> None:
        """Make the inner env pose ``task`` (at reset, before the inner reset). Here nothing: the
        task is in the reward only."""


class PointGoalEnv(GoalEnv):
    """point-robot: the task moves the :class:`PointRobot`'s goal."""

    def _pose(self, task: GoalTask) -> None:
        self.env.unwrapped.goal = np.asarray(task.params["goal"], dtype=np.float64)


class RandParamsEnv(GoalEnv):
    """walker-rand-params: the task's multipliers scale the compiled model's arrays (see the module
    docstring); ``compiled`` keeps the arrays as compiled."""

    def __init__(self, env: gym.Env, family: GoalFamily, seed: int | None = None) -> None:
        super().__init__(env, family, seed=seed)
        model = self.env.unwrapped.model
        self.compiled = {name: getattr(model, name).copy() for name in RAND_PARAMS}

    def _pose(self, task: GoalTask) -> None:
        import mujoco

        model = self.env.unwrapped.model
        for name, compiled in self.compiled.items():
            scale = np.asarray(task.params["scales"][name], dtype=np.float64)
            if scale.shape != compiled.shape:
                raise ConfigError(
                    f"{task.describe()}: {name} multipliers of shape {scale.shape}, "
                    f"the model has {compiled.shape}"
                )
            np.copyto(getattr(model, name), compiled * scale)
        # on a scratch MjData: mj_setConst overwrites the state of the one it gets
        mujoco.mj_setConst(model, mujoco.MjData(model))


def _square(action: np.ndarray) -> float:
    return float(np.sum(np.square(action)))


def _cheetah_vel_reward(task: GoalTask, action: np.ndarray, info: dict, env: Any) -> float:
    """rlkit ``HalfCheetahVelEnv``: ``-|v - v*| - 0.05 |a|^2``."""
    return -abs(float(info["x_velocity"]) - task.params["velocity"]) - 0.05 * _square(action)


def _cheetah_dir_reward(task: GoalTask, action: np.ndarray, info: dict, env: Any) -> float:
    """rlkit ``HalfCheetahDirEnv``: ``d v - 0.05 |a|^2``."""
    return task.params["direction"] * float(info["x_velocity"]) - 0.05 * _square(action)


def _ant_dir_reward(task: GoalTask, action: np.ndarray, info: dict, env: Any) -> float:
    """rlkit ``AntDirEnv`` (forward_backward): ``d v - 0.5 |a|^2 - c + 1``."""
    forward = task.params["direction"] * float(info["x_velocity"])
    return forward - 0.5 * _square(action) + float(info["reward_contact"]) + 1.0


def _ant_goal_reward(task: GoalTask, action: np.ndarray, info: dict, env: Any) -> float:
    """rlkit ``AntGoalEnv``: ``-|xy - g|_1 - 0.1 |a|^2 - c``."""
    xy = np.array([info["x_position"], info["y_position"]], dtype=np.float64)
    distance = float(np.sum(np.abs(xy - np.asarray(task.params["goal"]))))
    return -distance - 0.1 * _square(action) + float(info["reward_contact"])


def _humanoid_dir_reward(task: GoalTask, action: np.ndarray, info: dict, env: Any) -> float:
    """rlkit ``HumanoidDirEnv``: ``0.25 (u . dcom) / opt.timestep`` plus Humanoid-v5's control,
    impact and alive terms."""
    angle = task.params["angle"]
    velocity = np.cos(angle) * info["x_velocity"] + np.sin(angle) * info["y_velocity"]
    forward = 0.25 * float(velocity) * env.dt / env.model.opt.timestep  # displacement / timestep
    return forward + float(info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"])


def _draw_goals_square(rng: np.random.RandomState, n: int) -> list[dict[str, Any]]:
    """rlkit ``PointEnv``: x, y ~ U[-1, 1], drawn in that order per goal."""
    return [{"goal": (float(x), float(y))} for x, y in rng.uniform(-1.0, 1.0, size=(n, 2))]


def _draw_velocities(rng: np.random.RandomState, n: int) -> list[dict[str, Any]]:
    """rlkit ``HalfCheetahVelEnv``: v* ~ U[0, 3]."""
    return [{"velocity": float(v)} for v in rng.uniform(0.0, 3.0, size=n)]


def _directions(*directions: int) -> Callable[[np.random.RandomState, int], list]:
    """cheetah-dir, ant-dir: the given directions (nothing drawn, however many are asked)."""
    return lambda rng, n: [{"direction": d} for d in directions]


def _draw_goals_disc(rng: np.random.RandomState, n: int) -> list[dict[str, Any]]:
    """rlkit ``AntGoalEnv``: angle 2 pi U, radius 3 sqrt(U) (all angles first)."""
    angle = rng.random_sample(n) * 2 * np.pi
    radius = 3 * rng.random_sample(n) ** 0.5
    return [
        {"goal": (float(x), float(y))}
        for x, y in zip(radius * np.cos(angle), radius * np.sin(angle))
    ]


def _draw_angles(rng: np.random.RandomState, n: int) -> list[dict[str, Any]]:
    """rlkit ``HumanoidDirEnv``: direction angle ~ U[0, 2 pi]."""
    return [{"angle": float(a)} for a in rng.uniform(0.0, 2.0 * np.pi, size=n)]


def _draw_scales(rng: np.random.RandomState, n: int) -> list[dict[str, Any]]:
    """rand_param_envs ``RandomEnv.sample_tasks``: per task and array, one b^U[-3, 3] per element."""
    lim = LOG_SCALE_LIMIT
    return [
        {
            "scales": {
                name: (base ** rng.uniform(-lim, lim, size=WALKER_SHAPES[name])).tolist()
                for name, base in RAND_PARAMS.items()
            }
        }
        for _ in range(n)
    ]


#: ``gymnasium.make`` kwargs per family (gymnasium's defaults otherwise; see the module docstring)
ENV_KWARGS: dict[str, dict[str, Any]] = {
    "cheetah-vel": {"exclude_current_positions_from_observation": False},
    "cheetah-dir": {"exclude_current_positions_from_observation": False},
    "ant-dir": {"include_cfrc_ext_in_observation": False},
    "ant-goal": {
        "exclude_current_positions_from_observation": False,
        "terminate_when_unhealthy": False,
    },
}


def _family(
    name: str,
    env_id: str | None,
    split: tuple[int, int],
    draw: Callable[[np.random.RandomState, int], list[dict[str, Any]]],
    reward: RewardFn | None = None,
    wrapper: type[GoalEnv] | None = None,
) -> GoalFamily:
    """Draw the family's tasks from RandomState(SEED) (``n_train + n_test`` of them, unless
    ``draw`` gives a fixed list); train on the first ``n_train``, test on the last ``n_test``."""
    n_train, n_test = split
    params = draw(np.random.RandomState(SEED), n_train + n_test)
    tasks = tuple(GoalTask(name, i, p) for i, p in enumerate(params))
    return GoalFamily(
        name,
        env_id,
        train_tasks=tasks[:n_train],
        test_tasks=tasks[len(tasks) - n_test :],
        reward=reward,
        env_kwargs=dict(ENV_KWARGS.get(name, {})),
        wrapper=wrapper,
    )


def build_goal_families() -> dict[str, GoalFamily]:
    """All families, their task lists drawn afresh (the same every time)."""
    families = [
        _family("point-robot", None, (80, 20), _draw_goals_square, wrapper=PointGoalEnv),
        _family("cheetah-vel", "HalfCheetah-v5", (100, 30), _draw_velocities, _cheetah_vel_reward),
        _family("cheetah-dir", "HalfCheetah-v5", (2, 2), _directions(-1, 1), _cheetah_dir_reward),
        _family("ant-dir", "Ant-v5", (2, 2), _directions(1, -1), _ant_dir_reward),
        _family("ant-goal", "Ant-v5", (150, 30), _draw_goals_disc, _ant_goal_reward),
        _family("humanoid-dir", "Humanoid-v5", (100, 30), _draw_angles, _humanoid_dir_reward),
        _family("walker-rand-params", "Walker2d-v5", (40, 10), _draw_scales, wrapper=RandParamsEnv),
    ]
    return {f.name: f for f in families}


GOAL_FAMILIES: dict[str, GoalFamily] = build_goal_families()


def get_goal_family(name: str) -> GoalFamily:
    """The PEARL task family called ``name``; ConfigError naming the valid ones otherwise."""
    if name not in GOAL_FAMILIES:
        raise ConfigError(
            f"unknown PEARL task family {name!r}: use one of {', '.join(GOAL_FAMILIES)}"
        )
    return GOAL_FAMILIES[name]
