"""metalab: classic meta-learning systems under one API — train, eval, data, reproduce.

User mistakes (bad flags, missing data, incompatible checkpoints) end with one line on stderr and
exit code 2; a traceback means a bug in metalab.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from metalab.errors import ConfigError, DataError, MetalabError
from metalab.experiments import EXPERIMENTS, L2O_MINUTES, QUICKSTART_EPISODES

if TYPE_CHECKING:
    from metalab.methods.base import MethodConfig


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag or value ends with ``PROG: error: ...`` (naming
    the value and, for choices, the valid ones) and exit code 2, like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train a method",
        description="Meta-train METHOD. Every field of the method's Config dataclass is a flag "
        "(--inner-lr for inner_lr; --x/--no-x for a bool): `metalab train METHOD --help` lists "
        "them with their defaults; --recipe NAME starts from a paper's settings instead.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_MethodsHelp, help="show this help and the methods")
    p.add_argument("method", metavar="METHOD", help="a method from the list below")
    p.add_argument("flags", nargs=argparse.REMAINDER, metavar="...", help="its flags")


class _MethodsHelp(argparse.Action):
    """``metalab train --help``: lists the registry's methods, imported (with torch) only then."""

    def __init__(self, option_strings, dest, help=None) -> None:
        super().__init__(
            option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import textwrap

        from metalab.methods import METHODS
        from metalab.rl import RL_METHODS, get_rl_method

        classes = {**METHODS, **{name: get_rl_method(name) for name in RL_METHODS}}
        rows = [
            textwrap.fill(
                _summary(cls), 100, initial_indent=f"  {name:15} ", subsequent_indent=18 * " "
            )
            for name, cls in classes.items()
        ]
        parser.epilog = "methods:\n" + "\n".join(rows)
        parser.print_help()
        parser.exit()


def _summary(cls) -> str:
    """The first paragraph of a method class's docstring, on one line."""
    text = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")


def method_parser(method: str) -> argparse.ArgumentParser:
    """The flags of ``metalab train METHOD``: the run's, then one per field of its Config."""
    from metalab.config_cli import add_config_flags

    cls, shared = _method_class(method)
    p = Parser(prog=f"metalab train {method}", description=_summary(cls))
    run = p.add_argument_group("the run")
    recipes = " | ".join(cls.recipes) or "none"
    run.add_argument("--recipe", help=f"start from these named settings: {recipes}")
    run.add_argument("--minutes", type=float, help="budget in wall-clock minutes")
    run.add_argument("--run-dir", type=Path, help="default runs/<method>-<recipe>")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    _common(run)
    add_config_flags(p, cls.Config, shared=shared)
    return p


def _method_class(name: str) -> tuple[type, type | None]:
    """The class registered under ``name`` (an episodic or an RL method) and its shared config."""
    from metalab.rl import RL_METHODS, get_rl_method

    if name in RL_METHODS:
        from metalab.rl.base import RLConfig

        cls = get_rl_method(name)
        return cls, RLConfig if issubclass(cls.Config, RLConfig) else None
    from metalab.methods import get_method
    from metalab.methods.base import MethodConfig

    return get_method(name), MethodConfig


def train_settings(args: argparse.Namespace) -> tuple[argparse.Namespace, MethodConfig]:
    """``metalab train METHOD FLAGS``: the parsed flags, and the config they give (the recipe's,
    or the Config defaults, with every given flag applied)."""
    from metalab.config_cli import overrides

    cls, _ = _method_class(args.method)
    opts = method_parser(args.method).parse_args(args.flags)
    config = cls.recipe(opts.recipe) if opts.recipe else cls.Config()
    return opts, config.updated(**overrides(opts, cls.Config))


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run directory (or 'mhd') on fixed test episodes")
    p.add_argument("target", help="a run directory, or 'mhd' for the training-free baseline")
    p.add_argument("--ways", type=int, help="default: the standard table 5/20-way x 1/5-shot")
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int, help="default 15 (classification), 100 (regression)")
    p.add_argument(
        "--episodes",
        type=int,
        help="default 1000; 600 (regression, per sub-dataset); RL: rollouts per test condition "
        "(mql: episodes per test task)",
    )
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
    p.add_argument(
        "--trials", type=int, default=1000, help="within-alphabet trials (50 per alphabet)"
    )
    p.add_argument(
        "--one-to-one",
        action="store_true",
        help="transductive: answer each Lake run or trial at once, every query a different "
        "character (marked in the tables)",
    )
    p.add_argument(
        "--verification",
        action="store_true",
        help="siamese: same/different accuracy on 10,000 pairs of evaluation alphabets",
    )
    p.add_argument(
        "--test-time",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="answer with a test-time setting of the method, e.g. support_augment=8 (protonet)",
    )
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument(
        "--compile", action="store_true", help="answer through torch.compile (metalab.compiling)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="regression: a run of the same task family to compare and plot (MAML, pretrained)",
    )
    p.add_argument(
        "--active-learning",
        type=int,
        default=0,
        metavar="TASKS",
        help="regression: active learning on that many tasks (10 rounds; about 0.1-0.5 s a task)",
    )
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-root", type=Path, help="default $METALAB_DATA or ~/.cache/metalab")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="metalab", description=__doc__.splitlines()[0])
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
        "--minutes",
        type=float,
        help=f"training budget in minutes (quickstart: none; l2o: {L2O_MINUTES:g})",
    )
    r.add_argument(
        "--episodes", type=int, help="test episodes per protocol (quickstart 600) or problems"
    )
    r.add_argument("--run-dir", type=Path, help="default runs/<experiment>")
    _common(r)
    _bench_parser(sub)
    return parser


def _bench_parser(sub) -> None:
    from metalab.bench import BASES, MODIFIERS, BenchSettings, default_variants

    d = BenchSettings()
    b = sub.add_parser(
        "bench", help="time MAML's meta-training step per backend, paired, against the FLOP floor"
    )
    b.add_argument(
        "--variants",
        default=",".join(default_variants()),
        help=f"comma-separated; a base ({' | '.join(BASES)}) and +modifiers "
        f"({' '.join('+' + m for m in MODIFIERS)}), e.g. vmap+compile (default %(default)s)",
    )
    for name, what in [
        ("tasks", "meta-batch"),
        ("ways", "classes per task"),
        ("shots", "support images per class"),
        ("queries", "query images per class"),
        ("filters", "Conv4 width"),
        ("inner_steps", "inner gradient steps"),
        ("repeats", "timed steps per variant, one per round"),
        ("warmup", "untimed steps per variant after its first"),
        ("threads", "torch threads per variant; 0: torch's default here"),
    ]:
        flag = "--" + name.replace("_", "-")
        b.add_argument(flag, type=int, default=getattr(d, name), help=f"{what} (%(default)s)")
    b.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    b.add_argument("--json", type=Path, default=Path("bench.json"), help="(default %(default)s)")


def cmd_train(args) -> None:
    from metalab.reports import show_training
    from metalab.train import train

    opts, config = train_settings(args)
    run_dir = opts.run_dir or Path("runs") / f"{args.method}-{opts.recipe or 'default'}"
    if _is_rl(args.method):
        _train_rl(args.method, opts, config, run_dir)
        return
    summary = train(
        args.method,
        config,
        run_dir,
        minutes=opts.minutes,
        resume=opts.resume,
        device=opts.device,
        data_root=opts.data_root,
        progress=not opts.no_progress,
    )
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        show_training(args.method, summary)


def _is_rl(method: str) -> bool:
    from metalab.rl import RL_METHODS

    return method in RL_METHODS


def _train_rl(method: str, opts, config, run_dir: Path) -> None:
    from metalab.reports import show_rl_training
    from metalab.rl.train import train_rl

    summary = train_rl(
        method, config, run_dir, minutes=opts.minutes, resume=opts.resume, device=opts.device,
        progress=not opts.no_progress,
    )  # fmt: skip
    show_rl_training(method, summary)


def _eval_rl(args) -> bool:
    """``metalab eval RL_RUN``: the RL protocol (returns, model error); False: not an RL run."""
    from metalab.config_cli import assignments
    from metalab.rl import is_rl_run

    if not is_rl_run(Path(args.target)):
        return False
    from metalab.reports import show_rl_evaluation
    from metalab.rl.evaluate import evaluate_rl_run

    image_flags = {
        "--ways": args.ways, "--shots": args.shots, "--queries": args.queries,
        "--lake-runs": args.lake_runs, "--within-alphabet": args.within_alphabet,
        "--verification": args.verification, "--one-to-one": args.one_to_one,
        "--data": args.data,
        "--baseline": args.baseline, "--labelled": args.labelled, "--compile": args.compile,
    }  # fmt: skip
    evaluation = evaluate_rl_run(
        Path(args.target), args.episodes, assignments(args.test_time, "--test-time"),
        refused=[flag for flag, value in image_flags.items() if value],
    )  # fmt: skip
    show_rl_evaluation(Path(args.target), evaluation)
    return True


def cmd_eval(args) -> None:
    from metalab.config_cli import assignments
    from metalab.evaluate import evaluate_mhd, evaluate_run

    if args.target != "mhd" and _eval_rl(args):
        return

    if args.target == "mhd":
        if args.lake_runs is None:
            raise ConfigError(
                "`metalab eval mhd` scores Lake's runs: pass --lake-runs PATH/all_runs.zip"
            )
        _show(evaluate_mhd(args.lake_runs, args.data_root, _decision(args)))
        return
    protocols = _protocols(args.ways, args.shots)
    if args.data == "mnist" and protocols is None:
        protocols = [(10, 1)]  # Koch et al. / Vinyals et al.: MNIST 10-way one-shot
    if protocols is None and (args.lake_runs or args.within_alphabet or args.verification):
        protocols = []
    evaluation = evaluate_run(
        Path(args.target),
        protocols,
        args.queries,
        args.episodes,
        args.lake_runs,
        baseline=args.baseline,
        active_learning=args.active_learning,
        shots=[args.shots] if args.shots else None,
        checkpoint=args.checkpoint,
        seed=args.seed,
        labelled=args.labelled,
        transfer=args.data,
        within_alphabet=args.trials if args.within_alphabet else 0,
        verification=args.verification,
        test_time=assignments(args.test_time, "--test-time"),
        decision=_decision(args),
        compile=args.compile,
        device=args.device,
        data_root=args.data_root,
    )
    _show(evaluation)


def _decision(args) -> str:
    return "one-to-one" if args.one_to_one else "argmax"


def _show(evaluation) -> None:
    """Print and save what :mod:`metalab.evaluate` measured; None: the method's own report did."""
    from metalab.reports import show_evaluation

    if evaluation is not None:
        show_evaluation(evaluation)


def _protocols(ways: int | None, shots: int | None) -> list[tuple[int, int]] | None:
    """The protocol asked for; None (neither given): the run's own default table."""
    if ways is None and shots is None:
        return None
    return [(ways or 5, 1 if shots is None else shots)]


def cmd_data(args) -> None:
    from metalab.data.download import check_files, fetch_dataset
    from metalab.data.omniglot import content_report
    from metalab.data.root import data_root

    root = data_root(args.data_root)
    if args.action == "fetch":
        for path in fetch_dataset(args.name, root):
            print(f"ok {path}")
        return
    from metalab.reports import data_check_table, print_tables

    rows = check_files(args.name, root)
    content = content_report(root) if args.name == "omniglot" else {}
    table, bad = data_check_table(f"{args.name} under {root}", rows, content)
    print_tables(table)
    if bad:
        raise DataError(
            f"{bad} file(s) missing or bad under {root}: run `metalab data fetch {args.name}`"
        )


def cmd_reproduce(args) -> None:
    from metalab.experiments import reproduce

    evaluation = reproduce(
        args.experiment,
        args.run_dir or Path("runs") / args.experiment,
        train_episodes=args.train_episodes,
        minutes=args.minutes,
        test_episodes=args.episodes,
        device=args.device,
        data_root=args.data_root,
        progress=not args.no_progress,
    )
    _show(evaluation)


def cmd_bench(args) -> None:
    from metalab.bench import BenchSettings, run_bench
    from metalab.reports import bench_rows

    settings = BenchSettings(
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        **{k: getattr(args, k) for k in ("tasks", "ways", "shots", "queries", "filters",
                                          "inner_steps", "repeats", "warmup", "threads")},
        device=args.device,
    )  # fmt: skip
    say = lambda line: print(f"bench: {line}", flush=True)  # noqa: E731
    bench_rows(run_bench(settings, progress=say, out=args.json))
    print(f"saved: {args.json}")


def main(argv: list[str] | None = None) -> int:
    from metalab.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()
    handlers = {
        "train": cmd_train, "eval": cmd_eval, "data": cmd_data, "reproduce": cmd_reproduce,
        "bench": cmd_bench,
    }  # fmt: skip
    try:
        handlers[args.command](args)
    except MetalabError as err:
        print(f"metalab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
