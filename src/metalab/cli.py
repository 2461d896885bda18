"""metalab: classic meta-learning systems under one API — train, eval, data, reproduce.

User mistakes (bad flags, missing data, incompatible checkpoints) end with one line on stderr and
exit code 2; a traceback means a bug in metalab.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metalab.errors import ConfigError, DataError, MetalabError

STANDARD_TABLE = ((5, 1), (5, 5), (20, 1), (20, 5))  # (ways, shots) of the Omniglot tables
EXPERIMENTS = ("quickstart", "l2o-quadratic", "l2o-mnist")  # metalab reproduce
# The quickstart's budget is in episodes, so it gives the same model on every machine (a minutes
# budget gave 4x fewer episodes on a CPU without native bf16); 1,500 is about what its former
# 3 minutes gave on the 2-core AVX-512 BF16 machine.
QUICKSTART_EPISODES = 1500


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="meta-train a method")
    p.add_argument(
        "method",
        help="protonet | protonet-zero | maml | fomaml | matching | siamese | gnn | l2o | meta-lstm | mann",
    )
    p.add_argument("--recipe", help="named settings from the paper (see the method's file)")
    p.add_argument(
        "--data", help="omniglot | mnist | miniimagenet | cub; l2o: quadratic | mnist (problems)"
    )
    p.add_argument("--split", help="vinyals | lake (Omniglot), reed (CUB)")
    p.add_argument("--train-part", choices=["train", "trainval"])
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--eval-ways", type=int, help="validation episodes' ways")
    p.add_argument("--eval-shots", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--meta-batch", type=int, help="tasks per optimizer step")
    p.add_argument("--labelled", type=int, help="labelled support examples per class (gnn)")
    p.add_argument("--eval-labelled", type=int, help="the same for validation episodes")
    g = p.add_argument_group("gradient-based methods (maml, fomaml)")
    g.add_argument("--inner-steps", type=int, help="inner gradient steps in training")
    g.add_argument("--inner-lr", type=float, help="inner step size (alpha)")
    g.add_argument("--eval-inner-steps", type=int, help="inner steps when testing")
    g.add_argument("--first-order", action="store_const", const=True, help="first-order MAML")
    g.add_argument("--learn-inner-lr", action="store_const", const=True, help="Meta-SGD rates")
    g.add_argument("--backend", choices=["auto", "vmap", "loop"], help="meta-gradient backend")
    g.add_argument("--chunk-size", type=int, help="vmap: at most this many tasks at once")
    m = p.add_argument_group("matching networks")
    m.add_argument("--fce", action=argparse.BooleanOptionalAction, help="full context embeddings")
    n = p.add_argument_group("graph neural networks")
    n.add_argument(
        "--active",
        action=argparse.BooleanOptionalAction,
        help="active learning: ask for one hidden label per graph (needs --labelled < --shots)",
    )
    a = p.add_argument_group("memory-augmented networks (mann)")
    a.add_argument("--labels", help="onehot | string (5 characters over a..e)")
    a.add_argument("--classes", type=int, help="classes per episode (5, 15)")
    a.add_argument("--instances", type=int, help="drawings of each class per episode (10)")
    a.add_argument("--model", help="mann | lstm | ff (the baselines on the same episodes)")
    a.add_argument(
        "--key-strength",
        action=argparse.BooleanOptionalAction,
        help="sharpen reads with a learned NTM key strength (default on; off = the printed Eq. 2)",
    )
    s = p.add_argument_group(
        "speed switches (auto: timed on the first batch and kept; see metalab.arithmetic)"
    )
    s.add_argument("--bf16", choices=["auto", "on", "off"], help="bfloat16 autocast (protonet)")
    s.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        help="channels-last conv activations (protonet, maml, matching, siamese, gnn)",
    )
    p.add_argument("--val-every", type=int, help="episodes between validations (0: never)")
    p.add_argument("--val-episodes", type=int, help="fixed validation episodes")
    p.add_argument("--seed", type=int)
    p.add_argument("--episodes", type=int, help="budget in training episodes")
    p.add_argument("--minutes", type=float, help="budget in wall-clock minutes")
    p.add_argument("--run-dir", type=Path, help="default runs/<method>-<recipe>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    _common(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run directory (or 'mhd') on fixed test episodes")
    p.add_argument("target", help="a run directory, or 'mhd' for the training-free baseline")
    p.add_argument("--ways", type=int, help="default: the standard table 5/20-way x 1/5-shot")
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int, help="default 15 (classification), 100 (regression)")
    p.add_argument("--episodes", type=int, help="default 1000 (classification), 600 (regression)")
    p.add_argument("--seed", type=int, help="test-episode seed (default: the fixed EVAL_SEED)")
    p.add_argument("--labelled", type=int, help="labelled support examples per class (gnn)")
    p.add_argument(
        "--data",
        choices=["mnist"],
        help="transfer: test on another dataset, never trained on (default 10-way 1-shot)",
    )
    p.add_argument("--lake-runs", type=Path, help="score on Lake's one-shot runs (all_runs.zip)")
    p.add_argument(
        "--within-alphabet",
        action="store_true",
        help="Koch/Lake 20-way within-alphabet one-shot trials on the evaluation alphabets",
    )
    p.add_argument("--trials", type=int, default=400, help="within-alphabet trials")
    p.add_argument(
        "--verification",
        action="store_true",
        help="siamese: same/different accuracy on 10,000 pairs of evaluation alphabets",
    )
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--baseline", type=Path, help="regression: a pretrained run to compare and plot")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", type=Path, help="default $METALAB_DATA or ~/.cache/metalab")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    d = sub.add_parser("data", help="fetch or check datasets under the data root")
    d.add_argument("action", choices=["fetch", "check"])
    d.add_argument("name", nargs="?", default="omniglot", help="omniglot | mnist")
    d.add_argument("--data-root", type=Path)
    r = sub.add_parser("reproduce", help="run a documented experiment end to end")
    r.add_argument("experiment", help=" | ".join(EXPERIMENTS))
    r.add_argument(
        "--train-episodes",
        type=int,
        help=f"training budget in episodes (quickstart: {QUICKSTART_EPISODES:,})",
    )
    r.add_argument(
        "--minutes", type=float, help="training budget in minutes (quickstart: none; l2o: 3)"
    )
    r.add_argument(
        "--episodes", type=int, help="test episodes per protocol (quickstart 600) or problems"
    )
    r.add_argument("--run-dir", type=Path, help="default runs/<experiment>")
    _common(r)
    return parser


def cmd_train(args) -> None:
    from metalab.methods import get_method
    from metalab.train import train

    cls = get_method(args.method)
    config = cls.recipe(args.recipe) if args.recipe else cls.Config()
    overrides = {
        key: getattr(args, key)
        for key in (
            "data",
            "split",
            "train_part",
            "ways",
            "shots",
            "queries",
            "eval_ways",
            "eval_shots",
            "lr",
            "meta_batch",
            "labelled",
            "eval_labelled",
            "inner_steps",
            "inner_lr",
            "eval_inner_steps",
            "first_order",
            "learn_inner_lr",
            "backend",
            "chunk_size",
            "fce",
            "active",
            "labels",
            "classes",
            "instances",
            "model",
            "key_strength",
            "bf16",
            "channels_last",
            "val_every",
            "val_episodes",
            "seed",
            "episodes",
        )
        if getattr(args, key) is not None
    }
    config = config.updated(**overrides)
    run_dir = args.run_dir or Path("runs") / f"{args.method}-{args.recipe or 'default'}"
    summary = train(
        args.method,
        config,
        run_dir,
        minutes=args.minutes,
        resume=args.resume,
        device=args.device,
        data_root=args.data_root,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    best = ""
    if summary.best_val is not None:  # an accuracy, or another score (l2o: minus a loss)
        score = summary.best_val
        best = f", best val {100 * score:.2f}%" if 0 <= score <= 1 else f", best val {score:.4g}"
    print(f"{summary.run_dir}: {summary.episodes} episodes ({summary.stopped}){best}")
    if config.data == "sinusoid" and getattr(config, "inner_steps", 0) > 0:
        from metalab.plots import plot_sinusoid
        from metalab.train import load_method

        method, _ = load_method(summary.run_dir / "best.pt")
        figure = plot_sinusoid(method, summary.run_dir / "sinusoid.png")
        print(f"figure: {figure} (the full table: metalab eval {summary.run_dir})")
    if summary.stopped == "interrupted":
        print(f"resume with: metalab train {args.method} --run-dir {summary.run_dir} --resume")


def evaluate_run(
    run_dir: Path,
    protocols,
    queries: int | None,
    episodes: int | None,
    lake_runs: Path | None,
    *,
    baseline: Path | None = None,
    shots: list[int] | None = None,
    checkpoint: str = "best",
    seed: int | None = None,
    labelled: int | None = None,
    transfer: str | None = None,
    within_alphabet: int = 0,
    verification: bool = False,
    device: str = "auto",
    data_root: Path | None = None,
    progress: bool = True,
) -> None:
    """Evaluate a run directory on ``protocols`` [(ways, shots)] and/or Lake's runs; print and save.

    ``labelled``: labelled support examples per class (default: the run's ``eval_labelled``);
    ``transfer``: test on that dataset's test part instead of the run's own (``mnist``);
    ``within_alphabet``: that many 20-way within-alphabet trials (Koch et al.); ``verification``:
    a Siamese network's same/different accuracy. Both need a run trained on the Lake split."""
    from metalab.arithmetic import key, settle
    from metalab.data.datasets import load_dataset
    from metalab.evaluate import EVAL_SEED, evaluate, evaluate_lake_runs
    from metalab.reports import lake_table, print_tables, results_table, save_eval
    from metalab.train import REGRESSION_FAMILIES, load_method, resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a run directory (nor 'mhd'): pass a directory from `metalab train`"
        )
    name = "best.pt" if checkpoint == "best" else "checkpoint.pt"
    dev = resolve_device(device)
    method, saved = load_method(run_dir / name)
    method.to(dev)
    for note in settle(method, dev):  # the run's arithmetic, minus what this device lacks
        print(f"metalab: {note}")
    c = method.config
    if method.report(run_dir, episodes=episodes, device=dev, data_root=data_root):
        return  # a method with its own evaluation (curves and figures) wrote it into run_dir
    if c.data in REGRESSION_FAMILIES:
        _evaluate_regression_run(
            run_dir, method, saved, name, baseline, shots, episodes, queries, seed, dev
        )
        return
    zero_shot = c.eval_shots == 0  # classes given by meta-data, not examples
    if protocols is None:  # the method's own table
        protocols = [(c.eval_ways, 0)] if zero_shot else list(STANDARD_TABLE)
    protocols = [(ways, shots) for ways, shots in protocols if method.supports_ways(ways)]
    if not protocols and lake_runs is None and not (within_alphabet or verification):
        raise ConfigError(f"{run_dir} holds a {c.ways}-way model: evaluate it with --ways {c.ways}")
    if queries is None:
        queries = c.eval_queries if zero_shot else 15
    episodes = 1000 if episodes is None else episodes
    lake_only = {
        "Lake's runs": lake_runs is not None,
        "within-alphabet trials": within_alphabet,
        "verification": verification,
    }
    for what, asked in lake_only.items():
        if asked and (c.data, c.split) != ("omniglot", "lake"):
            raise ConfigError(
                f"{run_dir} was trained on the {c.data} {c.split} split, which includes Lake's "
                f"evaluation alphabets: score {what} with a model trained with --split lake"
            )
    results = []
    if protocols:
        if transfer is not None:
            test_set = load_dataset(transfer, "standard", "test", c.image_size, data_root)
        else:
            test_set = load_dataset(c.data, c.split, "test", c.image_size, data_root)
        for ways, shots in protocols:
            sampler = type(method).sampler(
                test_set,
                ways,
                shots,
                queries,
                seed=EVAL_SEED if seed is None else seed,
                labelled=c.eval_labelled if labelled is None else labelled,
            )
            result = evaluate(method, sampler, episodes, dev)
            result.protocol.update(
                split="standard" if transfer else c.split,
                trained_on=f"{c.data}/{c.split}/{c.train_part}",
                checkpoint=name,
                trained_episodes=saved["episode"],
            )
            results.append(result)
        if zero_shot and transfer is None:
            from metalab.methods.protonet_zero import evaluate_zero_shot_all

            result = evaluate_zero_shot_all(method, test_set, dev)
            result.protocol.update(
                split=c.split, checkpoint=name, trained_episodes=saved["episode"]
            )
            results.append(result)
    if within_alphabet or verification:
        from metalab.tasks.oneshot import evaluate_verification, evaluate_within_alphabet

        alphabets = load_dataset("omniglot", "lake", "test", c.image_size, data_root)
        seed = EVAL_SEED if seed is None else seed
        found = []
        if within_alphabet:
            found.append(
                evaluate_within_alphabet(method, alphabets, within_alphabet, seed=seed, device=dev)
            )
        if verification:
            found.append(evaluate_verification(method, alphabets, seed=seed, device=dev))
        for result in found:
            result.protocol.update(checkpoint=name, trained_episodes=saved["episode"])
        results += found
    lake = None
    if lake_runs is not None:
        from metalab.tasks.lake import load_runs

        lake = evaluate_lake_runs(method, load_runs(lake_runs, size=c.image_size), dev)
    title = f"{saved['method']} — {run_dir.name}"
    tables = [results_table(title, results)] if results else []
    if lake is not None:
        lake["source"] = str(lake_runs)
        tables.append(lake_table(f"{title}: 20-way within-alphabet one-shot runs", lake))
    print_tables(*tables)
    meta = {"method": saved["method"], "arithmetic": key(method.arithmetic)}
    save_eval(run_dir / "eval.json", results, lake, meta)


def _evaluate_regression_run(
    run_dir, method, saved, name, baseline, shots, episodes, queries, seed, dev
) -> None:
    """Sinusoid runs: MSE after 1/5/10 steps for K = 5/10/20 (App. C), against an optional
    pretrained baseline whose step size is tuned on validation tasks; writes sinusoid.png."""
    from metalab.evaluate import EVAL_SEED, evaluate_regression, tune_inner_lr
    from metalab.plots import plot_sinusoid
    from metalab.reports import print_tables, regression_table, save_eval
    from metalab.train import load_method

    seed = EVAL_SEED if seed is None else seed
    episodes = 600 if episodes is None else episodes
    queries = 100 if queries is None else queries

    def describe(model, directory: Path) -> str:
        kind = "pretrained" if model.config.inner_steps == 0 else model.name
        return f"{kind} ({directory.name})"

    models = [(describe(method, run_dir), method)]
    if baseline is not None:
        other, _ = load_method(Path(baseline) / name)
        models.append((describe(other, Path(baseline)), other.to(dev)))
    rows, tuned = [], {}
    for label, model in models:
        for k in shots or (5, 10, 20):
            lr = None
            if model.config.inner_steps == 0:  # trained without an inner step: tune alpha
                lr = tuned[(label, k)] = tune_inner_lr(model, k, device=dev)
            for result in evaluate_regression(
                model, k, episodes, queries=queries, seed=seed, device=dev, lr=lr
            ):
                result.protocol.update(
                    model=label, checkpoint=name, trained_episodes=saved["episode"]
                )
                rows.append((label, result))
    print_tables(regression_table(f"{saved['method']} — {run_dir.name}: sinusoid regression", rows))
    if method.config.inner_steps > 0:
        base = models[1][1] if len(models) > 1 else None
        base_lr = tuned.get((models[1][0], 5)) if base is not None else None
        figure = plot_sinusoid(method, run_dir / "sinusoid.png", base, base_lr, seed=seed)
        print(f"figure: {figure}")
    save_eval(run_dir / "eval.json", [r for _, r in rows], None, {"method": saved["method"]})


def cmd_eval(args) -> None:
    if args.target == "mhd":
        if args.lake_runs is None:
            raise ConfigError(
                "`metalab eval mhd` scores Lake's runs: pass --lake-runs PATH/all_runs.zip"
            )
        from metalab.evaluate import evaluate_lake_runs
        from metalab.methods.mhd import MHD
        from metalab.reports import lake_table, print_tables
        from metalab.tasks.lake import load_runs

        lake = evaluate_lake_runs(MHD(), load_runs(args.lake_runs, size=None))
        lake["source"] = str(args.lake_runs)
        print_tables(lake_table("modified Hausdorff distance (Lake's baseline), 105x105", lake))
        return
    protocols = _protocols(args.ways, args.shots)
    if args.data == "mnist" and protocols is None:
        protocols = [(10, 1)]  # Koch et al. / Vinyals et al.: MNIST 10-way one-shot
    if protocols is None and (args.lake_runs or args.within_alphabet or args.verification):
        protocols = []
    evaluate_run(
        Path(args.target),
        protocols,
        args.queries,
        args.episodes,
        args.lake_runs,
        baseline=args.baseline,
        shots=[args.shots] if args.shots else None,
        checkpoint=args.checkpoint,
        seed=args.seed,
        labelled=args.labelled,
        transfer=args.data,
        within_alphabet=args.trials if args.within_alphabet else 0,
        verification=args.verification,
        device=args.device,
        data_root=args.data_root,
    )


def _protocols(ways: int | None, shots: int | None) -> list[tuple[int, int]] | None:
    """The protocol asked for; None (neither given): the run's own default table."""
    if ways is None and shots is None:
        return None
    return [(ways or 5, 1 if shots is None else shots)]


def cmd_data(args) -> None:
    from metalab.data.download import check_files, fetch_dataset
    from metalab.data.root import data_root

    root = data_root(args.data_root)
    if args.action == "fetch":
        for path in fetch_dataset(args.name, root):
            print(f"ok {path}")
        return
    from rich.table import Table

    from metalab.reports import print_tables

    table = Table(title=f"{args.name} under {root}")
    for column in ("file", "present", "checksum", "content"):
        table.add_column(column)
    content = _content_check(args.name, root)
    bad = 0
    for row in check_files(args.name, root):
        verdict = content.get(row["path"], "")
        bad += row["status"] in ("missing", "corrupt") or verdict.startswith("BAD")
        present = "yes" if row["present"] else "MISSING"
        table.add_row(row["path"], present, _checksum_word(row), verdict)
    print_tables(table)
    if bad:
        raise DataError(
            f"{bad} file(s) missing or bad under {root}: run `metalab data fetch {args.name}`"
        )


def _checksum_word(row: dict) -> str:
    return {
        "ok": "official",
        "missing": "-",
        "unverified": "no known checksum",
        "repacked": "repacked copy (accepted on content)",
        "corrupt": "DIFFERS: delete it and fetch again",
    }[row["status"]]


def _content_check(name: str, root: Path) -> dict[str, str]:
    """Counts of alphabets / characters / drawings of each Omniglot archive that is present."""
    if name != "omniglot":
        return {}
    from metalab.data.omniglot import ARCHIVES, load_archive

    report = {}
    for which, path in ARCHIVES.items():
        if (root / path).exists():
            try:
                images, characters = load_archive(which, root, size=28, download=False)
                alphabets = len({c.split("/")[0] for c in characters})
                report[path] = (
                    f"ok: {alphabets} alphabets, {len(characters)} characters, {images.shape[1]} drawings each"
                )
            except MetalabError as err:
                report[path] = f"BAD: {err}"
    return report


def cmd_reproduce(args) -> None:
    if args.experiment not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {args.experiment!r}: use one of {', '.join(EXPERIMENTS)}"
        )
    args.run_dir = args.run_dir or Path("runs") / args.experiment
    if args.experiment.startswith("l2o-"):
        return _reproduce_l2o(args, args.experiment.removeprefix("l2o-"))
    from metalab.data.download import require, resource
    from metalab.data.root import data_root
    from metalab.methods.protonet import ProtoNet

    root = data_root(args.data_root)
    runs_zip = require(resource("omniglot/all_runs.zip"), root)
    episodes = args.train_episodes or QUICKSTART_EPISODES
    config = ProtoNet.recipe("lake").updated(episodes=episodes)
    budget = f"{episodes:,} episodes" + (f" (at most {args.minutes:g} min)" if args.minutes else "")
    print(
        f"Training Prototypical Networks for {budget} on Omniglot's background alphabets "
        "(25 to learn, 5 to validate; 60-way 1-shot episodes), then testing on the 20 evaluation "
        "alphabets and on Lake's 20 one-shot runs."
    )
    _train_unless_done(args, "protonet", config, root)
    evaluate_run(
        args.run_dir,
        list(STANDARD_TABLE),
        15,
        args.episodes or 600,
        runs_zip,
        device=args.device,
        data_root=root,
    )


def _train_unless_done(args, method: str, config, root: Path) -> None:
    """Train ``method`` into ``args.run_dir`` for ``args.minutes``, unless a run is already there."""
    from metalab.train import train

    if (args.run_dir / "checkpoint.pt").exists():
        print(f"{args.run_dir} already holds a run: evaluating it (delete it to retrain)")
        return
    train(
        method,
        config,
        args.run_dir,
        minutes=args.minutes,
        device=args.device,
        data_root=root,
        progress=not args.no_progress,
    )


def _reproduce_l2o(args, recipe: str) -> None:
    """Andrychowicz et al. 2016: meta-train the LSTM optimizer on a problem family, then its loss
    curves against the tuned hand-designed optimizers (PNGs and eval.json in the run directory)."""
    from metalab.data.root import data_root
    from metalab.methods.l2o import L2O

    root = data_root(args.data_root)
    args.minutes = args.minutes or 3.0
    print(
        f"Meta-training the LSTM optimizer for {args.minutes:g} min on {recipe} problems, then "
        "comparing it on fixed test problems with SGD, RMSprop, Adam and NAG (learning rates "
        "tuned on validation problems)."
    )
    _train_unless_done(args, "l2o", L2O.recipe(recipe), root)
    evaluate_run(args.run_dir, None, None, args.episodes, None, device=args.device, data_root=root)
    print(f"figures and eval.json in {args.run_dir}")


def main(argv: list[str] | None = None) -> int:
    from metalab.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()
    handlers = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "reproduce": cmd_reproduce}
    try:
        handlers[args.command](args)
    except MetalabError as err:
        print(f"metalab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
