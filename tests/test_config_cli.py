"""`metalab train METHOD` flags come from the method's Config: every field a flag, every documented
command parsing with the real parser (nothing is trained here)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from metalab.cli import build_parser, main, method_parser, train_settings
from metalab.config_cli import add_config_flags, choices_of, field_comments, overrides, settings
from metalab.errors import ConfigError
from metalab.methods import METHODS
from metalab.methods.base import MethodConfig
from metalab.rl import RL_METHODS, get_rl_method

ROOT = Path(__file__).resolve().parents[1]
# `metalab train METHOD ...` up to a comment, a closing backtick or the end of the line
COMMAND = re.compile(r"metalab train ([a-z][\w-]*)([^`#\n]*)")


def train(argv: str):
    """Parse ``metalab train ...`` (both stages) and build its config, without training."""
    args = build_parser().parse_args(["train", *shlex.split(argv)])
    return train_settings(args)


def documented_commands(path: Path) -> list[str]:
    return [f"{m.group(1)} {m.group(2).strip()}" for m in COMMAND.finditer(path.read_text())]


def test_readme_commands_parse():
    commands = documented_commands(ROOT / "README.md")
    assert len(commands) >= 15, commands  # the pattern still finds the README's commands
    for command in commands:
        opts, config = train(command)
        name = command.split()[0]
        cls = get_rl_method(name) if name in RL_METHODS else METHODS[name]
        assert isinstance(config, cls.Config), command


@pytest.mark.parametrize(
    "path",
    sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("benchmarks/*.md")),
    ids=lambda p: p.name,
)
def test_other_documented_commands_parse(path):
    for command in documented_commands(path):
        train(command)


# Every flag `metalab train` had before the flags came from the configs, with a value and the
# method it applies to: same spelling, same meaning.
OLD_FLAGS = [
    ("protonet", "--data mnist", {"data": "mnist"}),
    ("protonet", "--split lake", {"split": "lake"}),
    ("protonet", "--train-part trainval", {"train_part": "trainval"}),
    ("protonet", "--ways 60 --shots 5 --queries 5", {"ways": 60, "shots": 5, "queries": 5}),
    ("protonet", "--eval-ways 20 --eval-shots 5", {"eval_ways": 20, "eval_shots": 5}),
    ("protonet", "--lr 3e-4 --meta-batch 4", {"lr": 3e-4, "meta_batch": 4}),
    ("gnn", "--labelled 1 --eval-labelled 2", {"labelled": 1, "eval_labelled": 2}),
    ("maml", "--inner-steps 5 --inner-lr 0.1", {"inner_steps": 5, "inner_lr": 0.1}),
    ("maml", "--eval-inner-steps 10", {"eval_inner_steps": 10}),
    ("maml", "--first-order --learn-inner-lr", {"first_order": True, "learn_inner_lr": True}),
    ("maml", "--backend loop --chunk-size 8", {"backend": "loop", "chunk_size": 8}),
    ("matching", "--fce", {"fce": True}),
    ("matching", "--no-fce", {"fce": False}),
    ("gnn", "--active", {"active": True}),
    ("gnn", "--no-active", {"active": False}),
    ("mann", "--labels string --classes 15", {"labels": "string", "classes": 15}),
    ("mann", "--instances 5 --model lstm", {"instances": 5, "model": "lstm"}),
    ("mann", "--no-key-strength", {"key_strength": False}),
    ("mann", "--key-strength", {"key_strength": True}),
    ("protonet", "--bf16 off --channels-last on", {"bf16": "off", "channels_last": "on"}),
    ("siamese", "--channels-last auto", {"channels_last": "auto"}),
    ("protonet", "--val-every 0 --val-episodes 50", {"val_every": 0, "val_episodes": 50}),
    ("protonet", "--seed 3 --episodes 20", {"seed": 3, "episodes": 20}),
]


@pytest.mark.parametrize("method, flags, expected", OLD_FLAGS)
def test_old_flags_keep_their_meaning(method, flags, expected):
    _, config = train(f"{method} {flags}")
    assert {name: getattr(config, name) for name in expected} == expected


def test_run_flags_are_not_settings(tmp_path):
    opts, config = train(
        f"maml --recipe omniglot-5w1s --minutes 2.5 --run-dir {tmp_path} --resume "
        f"--device cpu --data-root {tmp_path} --no-progress"
    )
    assert (opts.recipe, opts.minutes, opts.run_dir, opts.resume) == (
        "omniglot-5w1s",
        2.5,
        tmp_path,
        True,
    )
    assert (opts.device, opts.data_root, opts.no_progress) == ("cpu", tmp_path, True)
    assert config == METHODS["maml"].recipe("omniglot-5w1s")  # no flag: the recipe untouched


def test_flags_override_the_recipe_and_nothing_else():
    _, config = train("fomaml --recipe omniglot-5w1s --no-first-order --inner-lr 0.2")
    recipe = METHODS["fomaml"].recipe("omniglot-5w1s")
    assert recipe.first_order is True  # the flag turns the recipe's True off
    assert config == dataclasses.replace(recipe, first_order=False, inner_lr=0.2)


@pytest.mark.parametrize(
    "argv",
    [
        "protonet --fce",  # another method's setting
        "maml --bf16 on",
        "protonet --train-part test",  # outside the choices
        "maml --backend fast",
        "protonet --ways five",  # not an int
        "protonet --arithmetic x",  # a dict field is no flag
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        train(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metalab train {argv.split()[0]}: error: ") and err.count("\n") == 1


def test_unknown_method_and_recipe_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        train("nope --ways 5")
    with pytest.raises(ConfigError, match="unknown recipe 'nope' for maml"):
        train("maml --recipe nope")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_field_is_a_flag(name):
    cls = METHODS[name]
    flags = {s.name: s for s in settings(cls.Config)}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert set(flags) == fields - {"arithmetic"}
    for recipe in [cls.Config(), *cls.recipes.values()]:  # choices admit every value in use
        for s in flags.values():
            value = getattr(recipe, s.name)
            assert s.choices is None or value in s.choices, (name, s.name, value)
            assert value is None or isinstance(value, s.type) or s.type is float, (name, s.name)
    options = method_parser(name)._option_string_actions
    assert all(s.flag in options for s in flags.values())
    for s in flags.values():
        if s.type is bool:
            assert "--no-" + s.flag[2:] in options


def test_help_lists_methods_and_settings(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in METHODS)
    assert "nearest prototype under squared Euclidean distance" in out  # the class docstring
    with pytest.raises(SystemExit) as stop:
        main(["train", "maml", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--inner-lr X alpha (default: 0.4)" in out  # the field's comment and default
    assert "--first-order, --no-first-order drop the second derivatives" in out
    assert "--backend {auto,vmap,loop}" in out
    assert "omniglot-5w1s" in out  # --recipe lists the recipes
    assert "--val-every N episodes between validations; 0 = never (default: 500)" in out


@dataclasses.dataclass
class _Base:
    size: int = 3  # base help
    mode: str = "a"  # a | b (the second) | c-d: what it picks


@dataclasses.dataclass
class _Toy(_Base):
    size: int = 4
    rate: float | None = None  # a rate (long comments go on
    # over a second line) until the parenthesis closes
    flag: bool = True
    # explained above
    name: str = "x"
    table: dict = dataclasses.field(default_factory=dict)  # not a flag


def test_a_new_field_is_one_edit():
    """A field in a dataclass is a flag with its type, default, help and choices; nothing else."""
    assert field_comments(_Toy) == {
        "size": "base help",
        "mode": "a | b (the second) | c-d: what it picks",
        "rate": "a rate (long comments go on over a second line) until the parenthesis closes",
        "name": "explained above",
        "table": "not a flag",
    }
    found = {s.name: (s.type, s.default, s.choices) for s in settings(_Toy)}
    assert found == {
        "size": (int, 4, None),
        "mode": (str, "a", ("a", "b", "c-d")),
        "rate": (float, None, None),
        "flag": (bool, True, None),
        "name": (str, "x", None),
    }
    parser = argparse.ArgumentParser()
    add_config_flags(parser, _Toy)
    args = parser.parse_args(["--size", "5", "--mode", "c-d", "--rate", "0.5", "--no-flag"])
    assert overrides(args, _Toy) == {"size": 5, "mode": "c-d", "rate": 0.5, "flag": False}
    assert overrides(parser.parse_args([]), _Toy) == {}


@pytest.mark.parametrize(
    "comment, choices",
    [
        ("auto | on | off: channels-last", ("auto", "on", "off")),
        ("auto | vmap | loop (see metalab.functional)", ("auto", "vmap", "loop")),
        ("conv4 (28x28, 64-d) | koch (105x105; Fig. 4)", ("conv4", "koch")),
        ("class split: vinyals | lake", None),  # a list that does not open the comment
        ("a | b is better", None),
        ("dataset name", None),
    ],
)
def test_choices_of(comment, choices):
    assert choices_of(comment) == choices


def test_method_config_fields_are_shared():
    text = method_parser("protonet").format_help()
    shared = text.split("settings every method has (MethodConfig):")[1]
    own = text.split("settings (ProtoNetConfig):")[1].split("settings every method has")[0]
    assert "--hidden" in own and "--bf16" in own and "--ways" not in own
    assert all(
        ("--" + f.name.replace("_", "-")) in shared
        for f in dataclasses.fields(MethodConfig)
        if f.name != "arithmetic"
    )
