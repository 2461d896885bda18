"""The command line: one-line errors for user mistakes, and train -> eval end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from metalab.cli import main


def error_of(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metalab: error: "), err
    return err


def test_no_traceback_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "metalab.cli", "train", "nosuchmethod"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    from metalab.methods import METHODS

    expected = f"unknown method 'nosuchmethod': use one of {', '.join(sorted(METHODS))}"
    assert proc.stderr == f"metalab: error: {expected}\n"


def test_unknown_recipe(capsys):
    assert "unknown recipe 'nope' for protonet: use one of" in error_of(
        capsys, ["train", "protonet", "--recipe", "nope"]
    )


@pytest.mark.realdata
def test_too_many_ways(capsys, omniglot_root, tmp_path):
    err = error_of(
        capsys,
        [
            "train",
            "protonet",
            "--ways",
            "5000",
            "--run-dir",
            str(tmp_path),
            "--data-root",
            str(omniglot_root),
            "--no-progress",
        ],
    )
    assert "ways=5000 is more than the 4112 classes of omniglot/vinyals/train" in err


@pytest.mark.realdata
def test_too_many_shots_and_queries(capsys, omniglot_root, tmp_path):
    err = error_of(
        capsys,
        [
            "train",
            "protonet",
            "--shots",
            "10",
            "--queries",
            "15",
            "--run-dir",
            str(tmp_path),
            "--data-root",
            str(omniglot_root),
            "--no-progress",
        ],
    )
    assert "shots+queries=25" in err


def test_missing_archive(capsys, tmp_path, offline):
    err = error_of(
        capsys,
        [
            "train",
            "protonet",
            "--run-dir",
            str(tmp_path / "run"),
            "--data-root",
            str(tmp_path / "empty"),
            "--no-progress",
        ],
    )
    assert "omniglot/" in err and "put it in" in err


@pytest.mark.realdata
def test_corrupt_archive(capsys, omniglot_root, tmp_path, monkeypatch):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "root" / "omniglot"
    root.mkdir(parents=True)
    (root / "images_background.zip").write_bytes(b"PK\x03\x04 truncated")
    err = error_of(
        capsys,
        [
            "train",
            "protonet",
            "--split",
            "lake",
            "--run-dir",
            str(tmp_path / "run"),
            "--data-root",
            str(tmp_path / "root"),
            "--no-progress",
        ],
    )
    assert "images_background.zip is corrupt or truncated" in err


def test_eval_errors(capsys, tmp_path):
    assert "is not a run directory" in error_of(capsys, ["eval", str(tmp_path / "nope")])
    torch.save({"weights": 1}, tmp_path / "best.pt")
    assert "is not a metalab checkpoint" in error_of(capsys, ["eval", str(tmp_path)])
    assert "pass --lake-runs" in error_of(capsys, ["eval", "mhd"])


@pytest.mark.realdata
def test_train_then_eval(capsys, omniglot_root, tmp_path):
    run, runs_zip = tmp_path / "run", omniglot_root / "omniglot/all_runs.zip"
    common = f"--data-root {omniglot_root} --no-progress".split()
    train = "train protonet --split lake --ways 10 --queries 5 --episodes 20 --val-episodes 20"
    assert main([*train.split(), "--run-dir", str(run), *common]) == 0
    evaluate = f"eval {run} --ways 20 --shots 1 --episodes 20 --lake-runs {runs_zip}"
    assert main([*evaluate.split(), *common]) == 0
    out = capsys.readouterr().out
    assert "omniglot/lake/test" in out and "20-way within-alphabet one-shot runs" in out
    assert "Atlantean" in out and "run01, run02" in out  # the error of each alphabet
    stored = json.loads((run / "eval.json").read_text())
    (result,) = stored["results"]
    assert result["protocol"]["ways"] == 20 and result["protocol"]["episodes"] == 20
    assert stored["lake"]["runs"] == 20 and 0 <= stored["lake"]["mean_error"] <= 100
    assert stored["lake"]["alphabets"] == 10 and stored["lake"]["sem_alphabets"] is not None
    # a vinyals-split model must not be scored on Lake's runs (its training saw those alphabets)
    vinyals = tmp_path / "vinyals"
    train = f"train protonet --ways 5 --episodes 2 --val-every 0 --run-dir {vinyals}"
    assert main([*train.split(), *common]) == 0
    capsys.readouterr()
    err = error_of(capsys, [*f"eval {vinyals} --lake-runs {runs_zip}".split(), *common])
    assert "score Lake's runs with a model trained with --split lake" in err


@pytest.mark.realdata
def test_data_check(capsys, omniglot_root):
    assert main(["data", "check", "omniglot", "--data-root", str(omniglot_root)]) == 0
    out = capsys.readouterr().out
    assert "30 alphabets, 964 characters, 20 drawings each" in out
    assert "20 alphabets, 659 characters" in out and "repacked" in out and "official" in out


def test_data_check_missing(capsys, tmp_path):
    err = error_of(capsys, ["data", "check", "mnist", "--data-root", str(tmp_path)])
    assert "4 file(s) missing or bad" in err and "metalab data fetch mnist" in err


@pytest.mark.realdata
def test_lake_protocols_from_the_cli_and_their_guard(capsys, omniglot_root, tmp_path):
    """Within-alphabet trials, verification and Lake's runs score a Lake-split model; a model
    that saw the evaluation alphabets (Vinyals split) is refused with one line."""
    common = ["--data-root", str(omniglot_root), "--no-progress", "--device", "cpu"]
    lake, vinyals = tmp_path / "lake", tmp_path / "vinyals"
    short = ["--episodes", "2", "--val-every", "0", "--ways", "8"]
    assert (
        main(["train", "siamese", "--recipe", "lake", *short, "--run-dir", str(lake), *common]) == 0
    )
    assert main(["train", "siamese", *short, "--run-dir", str(vinyals), *common]) == 0
    runs = str(omniglot_root / "omniglot" / "all_runs.zip")
    assert main(["eval", str(lake), "--within-alphabet", "--trials", "3", "--verification",
                 "--lake-runs", runs, *common]) == 0  # fmt: skip
    stored = json.loads((lake / "eval.json").read_text())
    kinds = {r["protocol"]["protocol"]: r["protocol"] for r in stored["results"]}
    assert kinds["within-alphabet"]["episodes"] == 3 and kinds["within-alphabet"]["ways"] == 20
    assert kinds["verification"]["pairs"] == 10_000 and stored["lake"]["runs"] == 20
    # the transductive decision: marked, and kept beside the plain scores in eval.json
    assert main(["eval", str(lake), "--within-alphabet", "--trials", "3", "--lake-runs", runs,
                 "--one-to-one", *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(one-to-one, transductive)" in out and "a person answers one drawing" in out
    stored = json.loads((lake / "eval.json").read_text())
    joint = stored["lake (one-to-one, transductive)"]
    assert joint["decision"] == "one-to-one" and stored["lake"].get("decision") is None
    trials = [
        r["protocol"] for r in stored["results"] if r["protocol"]["protocol"] != "verification"
    ]
    assert sorted(p.get("decision", "argmax") for p in trials) == ["argmax", "one-to-one"]
    assert "within_alphabet_by_alphabet (one-to-one, transductive)" in stored
    err = error_of(capsys, ["eval", str(lake), "--one-to-one", *common])
    assert "one-to-one decision answers Lake's runs" in err and "--within-alphabet" in err
    err = error_of(capsys, ["eval", str(vinyals), "--within-alphabet", *common])
    assert "trained on the omniglot vinyals split" in err and "--split lake" in err


def test_a_flag_the_method_cannot_answer_is_an_error(capsys, tmp_path):
    """--lake-runs, --within-alphabet and --verification on a method that cannot answer them end
    with one line and exit 2, not silently (here MAML on sinusoids, which needs no data)."""
    from metalab.methods.maml import MAML
    from metalab.train import train

    run = tmp_path / "sine"
    train("maml", MAML.recipe("sinusoid").updated(episodes=2), run, progress=False)
    asked = {
        "--lake-runs": "maml does not answer Lake's one-shot runs",
        "--within-alphabet": "maml does not answer within-alphabet one-shot trials",
        "--verification": "maml has no pair score",
    }
    for flag, message in asked.items():
        argv = ["eval", str(run), flag, *(["all_runs.zip"] if flag == "--lake-runs" else [])]
        assert message in error_of(capsys, [*argv, "--device", "cpu"])
