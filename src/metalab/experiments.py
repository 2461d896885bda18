"""The documented experiments of `metalab reproduce`: train a recipe into a run directory (unless a
run is already there), then evaluate it with :func:`metalab.evaluate.evaluate_run`.

Imports of torch and the methods happen inside the functions, so the command line's ``--help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path

from metalab.errors import ConfigError

EXPERIMENTS = ("quickstart", "l2o-quadratic", "l2o-mnist")
# The quickstart's budget is in episodes, so it gives the same model on every machine (a minutes
# budget gave 4x fewer episodes on a CPU without native bf16); 1,500 is about what its former
# 3 minutes gave on the 2-core AVX-512 BF16 machine.
QUICKSTART_EPISODES = 1500
L2O_MINUTES = 3.0  # the learned optimizer's default training budget


def reproduce(
    experiment: str,
    run_dir: Path,
    *,
    train_episodes: int | None = None,
    minutes: float | None = None,
    test_episodes: int | None = None,
    device: str = "auto",
    data_root: Path | None = None,
    progress: bool = True,
):
    """Run ``experiment`` (one of :data:`EXPERIMENTS`) in ``run_dir``; returns what
    :func:`metalab.evaluate.evaluate_run` measured (None: the method's own report ran).

    * ``quickstart``: ProtoNet's ``lake`` recipe for ``train_episodes`` (default 1,500) on the
      background alphabets, then the 5/20-way 1/5-shot table on the evaluation alphabets
      (``test_episodes``, default 600) and Lake's 20 runs.
    * ``l2o-quadratic`` / ``l2o-mnist``: the LSTM optimizer for ``minutes`` (default 3), then its
      loss curves against the tuned hand-designed optimizers.
    """
    from metalab.data.download import require, resource
    from metalab.data.root import data_root as resolve_root
    from metalab.evaluate import evaluate_run
    from metalab.methods import get_method

    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}: use one of {', '.join(EXPERIMENTS)}")
    root = resolve_root(data_root)
    if experiment == "quickstart":
        runs_zip = require(resource("omniglot/all_runs.zip"), root)
        episodes = train_episodes or QUICKSTART_EPISODES
        config = get_method("protonet").recipe("lake").updated(episodes=episodes)
        budget = f"{episodes:,} episodes" + (f" (at most {minutes:g} min)" if minutes else "")
        print(
            f"Training Prototypical Networks for {budget} on Omniglot's background alphabets "
            "(25 to learn, 5 to validate; 60-way 1-shot episodes), then testing on the 20 "
            "evaluation alphabets and on Lake's 20 one-shot runs."
        )
        _train_unless_done("protonet", config, run_dir, minutes, device, root, progress)
        return evaluate_run(
            run_dir, None, 15, test_episodes or 600, runs_zip, device=device, data_root=root
        )
    recipe = experiment.removeprefix("l2o-")  # Andrychowicz et al. 2016
    minutes = minutes or L2O_MINUTES
    print(
        f"Meta-training the LSTM optimizer for {minutes:g} min on {recipe} problems, then "
        "comparing it on fixed test problems with SGD, RMSprop, Adam and NAG (learning rates "
        "tuned on validation problems); figures and eval.json go into the run directory."
    )
    config = get_method("l2o").recipe(recipe)
    _train_unless_done("l2o", config, run_dir, minutes, device, root, progress)
    return evaluate_run(run_dir, episodes=test_episodes, device=device, data_root=root)


def _train_unless_done(method, config, run_dir: Path, minutes, device, root, progress) -> None:
    """Train ``method`` into ``run_dir``, unless a run is already there."""
    from metalab.train import train

    if (Path(run_dir) / "checkpoint.pt").exists():
        print(f"{run_dir} already holds a run: evaluating it (delete it to retrain)")
        return
    train(
        method, config, run_dir, minutes=minutes, device=device, data_root=root, progress=progress
    )
