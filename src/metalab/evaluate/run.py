"""`metalab eval`: every protocol a trained run answers, from its run directory.

:func:`evaluate_run` loads the run's checkpoint, refuses what the method cannot answer or must not
be scored on, and returns what it measured as a :class:`RunEvaluation`, which
:func:`metalab.reports.show_evaluation` prints and merges into the run's ``eval.json``. A method
with an evaluation of its own (loss curves, per-instance accuracy) runs it in its
:meth:`~metalab.methods.base.Method.report` hook instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metalab.data.root import data_root as resolve_root
from metalab.errors import ConfigError
from metalab.evaluate.fewshot import CACTUS_QUERIES, CACTUS_TABLES, STANDARD_TABLE, evaluate
from metalab.evaluate.lake import evaluate_lake_runs, require_unseen
from metalab.evaluate.multi import SUB_DATASET_DATA, SUB_DATASET_EPISODES, evaluate_sub_datasets
from metalab.evaluate.oneshot import evaluate_verification, within_alphabet_by_alphabet
from metalab.evaluate.protocol import (
    EVAL_SEED,
    Result,
    answer_protocol,
    answers,
    require_answers,
)
from metalab.evaluate.regression import (
    REGRESSION_SHOTS,
    REGRESSION_STEPS,
    RegressionComparison,
    compare_regression,
)
from metalab.evaluate.uncertainty import UncertaintyComparison, compare_uncertainty
from metalab.tasks.cactus import describe as describe_tasks
from metalab.tasks.lake import load_runs, run_alphabets

# The Lake-format protocols: (capability in Method.answers, what the guard's message calls it).
LAKE_PROTOCOLS = {
    "lake-runs": "Lake's runs",
    "within-alphabet": "within-alphabet trials",
    "verification": "verification",
}


@dataclass
class RunEvaluation:
    """What one `metalab eval` measured.

    Attributes:
        title: the results table's title (method and run).
        results: few-shot, zero-shot, within-alphabet and verification results.
        lake: Lake-format runs (:func:`metalab.evaluate.lake.lake_error`), or None.
        lake_title: the title of the Lake tables.
        regression: the regression comparison, or None.
        uncertainty: the regression models' draws scored (and active learning), or None.
        within_by_alphabet: the within-alphabet trials per alphabet, or None.
        eval_json: the file the results are merged into (None: not saved).
        meta: extra top-level entries of ``eval.json`` (method, arithmetic).
    """

    title: str
    results: list[Result] = field(default_factory=list)
    lake: dict | None = None
    lake_title: str = ""
    regression: RegressionComparison | None = None
    uncertainty: UncertaintyComparison | None = None
    within_by_alphabet: dict[str, Result] | None = None
    eval_json: Path | None = None
    meta: dict = field(default_factory=dict)


def evaluate_run(
    run_dir: Path,
    protocols: Sequence[tuple[int, int]] | None = None,
    queries: int | None = None,
    episodes: int | None = None,
    lake_runs: Path | None = None,
    *,
    baseline: Path | None = None,
    active_learning: int = 0,
    shots: Sequence[int] | None = None,
    checkpoint: str = "best",
    seed: int | None = None,
    labelled: int | None = None,
    transfer: str | None = None,
    within_alphabet: int = 0,
    verification: bool = False,
    test_time: dict[str, str] | None = None,
    decision: str = "argmax",
    compile: bool = False,
    device: str = "auto",
    data_root: Path | None = None,
) -> RunEvaluation | None:
    """Evaluate a run directory on ``protocols`` [(ways, shots)] and the Lake-format protocols.

    Args:
        run_dir: a directory written by `metalab train`.
        protocols: few-shot (ways, shots) to test; None: the method's own table (Omniglot's
            5/20-way 1/5-shot, or its zero-shot protocol); [] for none.
        queries: query examples per class (default 15, zero-shot: the run's ``eval_queries``;
            regression: query points per task, default 100).
        episodes: test episodes per protocol (default 1000; regression: tasks, default 600).
        lake_runs: a zip of Lake-format one-shot runs to score (``all_runs.zip``).
        baseline: regression: a run of the same task family to compare with (and draw in the
            figures), e.g. MAML's pretrained baseline or MAML beside LLAMA or PLATIPUS.
        active_learning: regression: that many tasks of active learning
            (:func:`metalab.evaluate.uncertainty.active_learning`); 0 for none.
        shots: regression: the K to test (default 5, 10 and 20).
        checkpoint: ``"best"`` (``best.pt``) or ``"last"`` (``checkpoint.pt``).
        seed: the test episodes' seed (default :data:`EVAL_SEED`).
        labelled: labelled support examples per class (default: the run's ``eval_labelled``).
        transfer: test on that dataset's test part instead of the run's own (``"mnist"``).
        within_alphabet: that many 20-way within-alphabet trials (Koch et al.); 0 for none.
        verification: a Siamese network's same/different accuracy on 10,000 pairs.
        test_time: settings of the method's :attr:`~metalab.methods.base.Method.test_time`
            fields to answer with (e.g. ``{"support_augment": "8"}``), as text or values; a
            regression ``baseline`` takes those of them it has too.
        decision: how Lake's runs and the within-alphabet trials turn scores into answers:
            ``"argmax"``, or ``"one-to-one"`` (transductive: each run's or trial's queries
            assigned to different characters at once; ``--one-to-one``).
        compile: answer through the method's compiled step (``--compile``; each compiled piece
            says how long its first call, the compilation, took).
        device: ``auto``, ``cpu`` or ``cuda``.
        data_root: where the datasets are (default ``$METALAB_DATA``).

    Returns:
        The measurements, or None when the method's own :meth:`report` ran its evaluation.

    Raises:
        ConfigError: not a run directory, a protocol the method does not answer, or a Lake-format
            protocol for a model whose training data could include the evaluation alphabets.
    """
    from metalab.arithmetic import key, resolve_device, settle
    from metalab.rundir import load_method

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a run directory (nor 'mhd'): pass a directory from `metalab train`"
        )
    name = "best.pt" if checkpoint == "best" else "checkpoint.pt"
    dev = resolve_device(device)
    method, saved = load_method(run_dir / name)
    method.config = apply_test_time(method, test_time or {})
    method.to(dev)
    for note in settle(method, dev):  # the run's arithmetic, minus what this device lacks
        print(f"metalab: {note}")
    if compile:
        method.enable_compile(announce=True)
    asked = {
        "lake-runs": lake_runs is not None,
        "within-alphabet": bool(within_alphabet),
        "verification": verification,
    }
    if decision != "argmax" and not (asked["lake-runs"] or asked["within-alphabet"]):
        raise ConfigError(
            f"the {decision} decision answers Lake's runs and within-alphabet trials: "
            "pass --lake-runs or --within-alphabet with it"
        )
    for protocol in (p for p, wanted in asked.items() if wanted):
        require_answers(method, protocol)
        require_unseen(method, LAKE_PROTOCOLS[protocol], source=run_dir)
    if method.report(run_dir, episodes=episodes, device=dev, data_root=data_root):
        return None  # a method with its own evaluation (curves and figures) wrote it into run_dir
    title = f"{saved['method']} — {run_dir.name}"
    tasks = describe_tasks(method.config)
    if tasks:
        title += f" (trained on {tasks})"
    stamp = {"checkpoint": name, "trained_episodes": saved["episode"]}
    if answers(method, "regression"):
        family = method.config.data
        models = [(_regression_label(method, run_dir), method)]
        if baseline is not None:
            other, _ = load_method(Path(baseline) / name)
            if other.config.data != family:
                raise ConfigError(
                    f"--baseline {baseline} was trained on {other.config.data} tasks, this run on "
                    f"{family}: compare runs of the same task family"
                )
            mine = {k: v for k, v in (test_time or {}).items() if k in type(other).test_time}
            other.config = apply_test_time(other, mine)  # both answer with the same settings
            models.append((_regression_label(other, Path(baseline)), other.to(dev)))
        tasks = 600 if episodes is None else episodes
        queries = 100 if queries is None else queries
        seed = EVAL_SEED if seed is None else seed
        comparison = compare_regression(
            models, shots or REGRESSION_SHOTS, tasks, queries, seed, dev,
            figure=run_dir / "sinusoid.png", family=family, steps=_regression_steps(method),
        )  # fmt: skip
        uncertainty = compare_uncertainty(
            models, family, method.config.eval_shots, tasks, queries, seed=seed, device=dev,
            active_tasks=active_learning, figure=run_dir / f"{family}-draws.png",
        )  # fmt: skip
        for _, result in comparison.rows + uncertainty.rows:
            result.protocol.update(stamp)
        return RunEvaluation(
            f"{title}: {family} regression",
            regression=comparison,
            uncertainty=uncertainty,
            eval_json=run_dir / "eval.json",
            meta={"method": saved["method"]},
        )
    c = method.config
    zero_shot = c.eval_shots == 0  # classes given by meta-data, not examples
    if protocols is None and c.data in SUB_DATASET_DATA:  # ARML's tables: the run's own shape
        protocols = [(c.eval_ways, c.eval_shots)]
    cactus = c.split == "cactus" or c.cactus != "off"  # unsupervised meta-learning's protocol
    if protocols is None and cactus and c.data in CACTUS_TABLES:
        protocols = list(CACTUS_TABLES[c.data])
    if protocols is None:  # the method's own table
        protocols = [(c.eval_ways, 0)] if zero_shot else list(STANDARD_TABLE)
    protocols = [(ways, shots) for ways, shots in protocols if method.supports_ways(ways)]
    if not (protocols or any(asked.values())):
        raise ConfigError(f"{run_dir} holds a {c.ways}-way model: evaluate it with --ways {c.ways}")
    seed = EVAL_SEED if seed is None else seed
    results = []
    if protocols:
        if queries is None:
            queries = CACTUS_QUERIES if cactus else c.eval_queries if zero_shot else 15
        if episodes is None and c.data in SUB_DATASET_DATA:
            episodes = SUB_DATASET_EPISODES  # per sub-dataset
        episodes = 1000 if episodes is None else episodes
        labelled = c.eval_labelled if labelled is None else labelled
        results += _few_shot(
            method, protocols, queries, episodes, seed, labelled, transfer, dev, data_root
        )
        for result in results:
            result.protocol.update(stamp)
    by_alphabet = None
    if within_alphabet or verification:
        found, by_alphabet = _one_shot(
            method, within_alphabet, verification, seed, dev, data_root, stamp, decision
        )
        results += found
    lake = None
    if lake_runs is not None:
        runs = load_runs(lake_runs, size=c.image_size)
        alphabets = run_alphabets(lake_runs, resolve_root(data_root))
        lake = evaluate_lake_runs(method, runs, dev, alphabets, decision)
        lake["source"] = str(lake_runs)
        how = answer_protocol(method)
        if how:
            lake["answers"] = how
    return RunEvaluation(
        title,
        results,
        lake,
        f"{title}: 20-way within-alphabet one-shot runs",
        eval_json=run_dir / "eval.json",
        meta={"method": saved["method"], "arithmetic": key(method.arithmetic)},
        within_by_alphabet=by_alphabet,
    )


def apply_test_time(method, settings: dict):
    """``method``'s config with ``settings`` of its test-time fields applied, each value given
    as text (``"8"``) or as a value and converted to the field's type; any other name, or a
    value that does not convert, is a ConfigError naming what may be set."""
    allowed = getattr(type(method), "test_time", ())
    config = method.config
    changes = {}
    for name, value in settings.items():
        if name not in allowed:
            what = ", ".join(allowed) if allowed else "nothing"
            raise ConfigError(
                f"--test-time {name}: {method.name} can change {what} at test time "
                "(retrain to change anything else)"
            )
        kind = type(getattr(config, name))
        try:
            if kind is bool and isinstance(value, str):  # bool("false") would be True
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                changes[name] = value.lower() in ("true", "1", "yes")
            else:
                changes[name] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"--test-time {name}={value}: {name} takes a {kind.__name__} value like "
                f"{getattr(config, name)}"
            ) from None
    return config.updated(**changes) if changes else config


def _few_shot(
    method, protocols, queries, episodes, seed, labelled, transfer, device, data_root
) -> list[Result]:
    """The (ways, shots) table on the run's test part, or ``transfer``'s; and, for a zero-shot
    method on its own data, every test image among all test classes."""
    from metalab.data.datasets import load_dataset

    c = method.config
    if transfer is not None:
        test_set = load_dataset(transfer, "standard", "test", c.image_size, data_root)
    else:
        test_set = load_dataset(c.data, c.split, "test", c.image_size, data_root)
    if transfer is None and getattr(test_set, "groups", None) is not None:  # evaluate.multi
        found = [
            result
            for ways, shots in protocols
            for result in evaluate_sub_datasets(
                method, test_set, ways, shots, queries, episodes, seed, device, labelled
            )
        ]
        for result in found:
            result.protocol.update(split=c.split, trained_on=f"{c.data}/{c.split}/{c.train_part}")
        return found
    results = []
    for ways, shots in protocols:
        sampler = type(method).sampler(test_set, ways, shots, queries, seed=seed, labelled=labelled)
        result = evaluate(method, sampler, episodes, device)
        result.protocol.update(
            split="standard" if transfer else c.split,
            trained_on=f"{c.data}/{c.split}/{c.train_part}",
            **({"training_tasks": describe_tasks(c)} if c.cactus != "off" else {}),
        )
        results.append(result)
    if c.eval_shots == 0 and transfer is None:
        from metalab.evaluate.zero_shot import evaluate_zero_shot_all

        result = evaluate_zero_shot_all(method, test_set, device)
        result.protocol.update(split=c.split)
        results.append(result)
    return results


def _one_shot(
    method, trials, verification, seed, device, data_root, stamp, decision
) -> tuple[list[Result], dict[str, Result] | None]:
    """Koch's protocols on the Lake split's evaluation alphabets; the within-alphabet trials also
    per alphabet."""
    from metalab.data.datasets import load_dataset

    alphabets = load_dataset("omniglot", "lake", "test", method.config.image_size, data_root)
    found, by_alphabet = [], None
    if trials:
        overall, by_alphabet = within_alphabet_by_alphabet(
            method, alphabets, trials, seed=seed, device=device, decision=decision
        )
        found.append(overall)
    if verification:
        found.append(evaluate_verification(method, alphabets, seed=seed, device=device))
    for result in [*found, *(by_alphabet or {}).values()]:
        result.protocol.update(stamp)
    return found, by_alphabet


def _regression_steps(method) -> tuple[int, ...]:
    """The step counts of the MSE table: App. C's 1, 5 and 10 on sinusoids; on another family,
    one step and the run's test steps (``eval_inner_steps``)."""
    if method.config.data == "sinusoid":
        return REGRESSION_STEPS
    return tuple(sorted({1, method.config.eval_inner_steps}))


def _regression_label(model, directory: Path) -> str:
    kind = "pretrained" if model.config.inner_steps == 0 else model.name
    return f"{kind} ({directory.name})"


def evaluate_mhd(
    lake_runs: Path, data_root: Path | None = None, decision: str = "argmax"
) -> RunEvaluation:
    """Lake's baseline, the modified Hausdorff distance (no training), on Lake-format runs at
    105x105."""
    from metalab.methods.mhd import MHD

    runs = load_runs(lake_runs, size=None)
    alphabets = run_alphabets(lake_runs, resolve_root(data_root))
    lake = evaluate_lake_runs(MHD(), runs, alphabets=alphabets, decision=decision)
    lake["source"] = str(lake_runs)
    title = "modified Hausdorff distance (Lake's baseline), 105x105"
    return RunEvaluation(title, lake=lake, lake_title=title)
