"""Meta-reinforcement learning: task distributions over simulated robots, rollouts, and the
meta-RL methods, one file per paper.

``envs`` (MuJoCo tasks perturbed at run time), ``rollout`` (trajectories and the replay that
aggregates them), ``dynamics`` (the shared learned dynamics model), ``mpc`` (random shooting and
CEM), ``train`` (the collect-fit loop with checkpoints) and ``evaluate`` (test returns with 95%
CIs, k-step model error). Methods: ``mb`` (MB and MB+DE), ``grbal`` and ``rebal`` (Nagabandi,
Clavera et al. 2019); ``mql`` (Meta-Q-Learning, Fakoor et al. 2020: TD3 with context,
propensity weighting, proximal adaptation) on ``pearl`` (the PEARL suite's goal and parameter
tasks), trained and tested by ``offpolicy``. Meta-learned curiosity (Alet et al. 2020): ``dsl``
(the typed program language, its executor, enumeration and duplicate pruning), ``programs`` (RND,
ICM-style, kNN, count-based, FAST, CCIM written in it), ``ppo`` (the learner), ``curiosity`` (a
program's lifetimes: ``metalab train curiosity``) and ``curiosity_search`` (the search over
programs: ``metalab train curiosity-search``). ``RL_METHODS`` maps the CLI name to
"module:Class"; the modules
import gymnasium and MuJoCo, so nothing is imported until a method is asked for.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from metalab.errors import ConfigError

RL_METHODS = {  # CLI name -> "module:Class" under metalab.rl
    "mb": "mb:MB",
    "grbal": "grbal:GrBAL",
    "rebal": "rebal:ReBAL",
    "mql": "mql:MQL",
    "curiosity": "curiosity:Curiosity",
    "curiosity-search": "curiosity_search:CuriositySearch",
}


def get_rl_method(name: str):
    """The RL method class registered under ``name``."""
    if name not in RL_METHODS:
        raise ConfigError(f"unknown RL method {name!r}: use one of {', '.join(RL_METHODS)}")
    module, cls = RL_METHODS[name].split(":")
    return getattr(import_module(f"metalab.rl.{module}"), cls)


def is_rl_run(run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` names an RL method (False when it is missing or not ours:
    the episodic path then says what is wrong)."""
    config = Path(run_dir) / "config.json"
    try:
        method = json.loads(config.read_text()).get("method", "") if config.exists() else ""
    except (ValueError, AttributeError):
        return False
    return method in RL_METHODS
