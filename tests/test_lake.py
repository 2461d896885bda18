"""Lake's one-shot runs: reading any zip in their layout, scoring, and the MHD baseline (38.8%)."""

from __future__ import annotations

import io
import math
import statistics
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalab.errors import DataError
from metalab.evaluate.lake import evaluate_lake_runs, lake_error
from metalab.evaluate.protocol import one_to_one
from metalab.methods.mhd import MHD, ink_points, mhd_matrix, modified_hausdorff
from metalab.tasks.lake import SOURCE_URL, LakeRun, decode_png, load_runs, run_alphabets


@pytest.fixture(scope="module")
def all_runs(require_data) -> Path:
    return require_data(["omniglot/all_runs.zip"]) / "omniglot" / "all_runs.zip"


def _png(ink: np.ndarray) -> bytes:
    """A 1-bit PNG drawn like Omniglot's: ink (True) black on white."""
    buffer = io.BytesIO()
    Image.fromarray(~ink).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def _predict(runs: list[LakeRun]) -> list[np.ndarray]:
    method = MHD()
    predictions = []
    for run in runs:
        support = torch.from_numpy(run.train).float().div(255)[:, None]
        query = torch.from_numpy(run.test).float().div(255)[:, None]
        logits = method.predict(support, torch.arange(len(run.train)), query)
        predictions.append(logits.argmax(-1).numpy())
    return predictions


# --- the official runs -------------------------------------------------------------------------


@pytest.mark.realdata
def test_official_runs_layout(all_runs):
    runs = load_runs(all_runs)
    assert [run.name for run in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for run in runs:
        assert run.train.shape == run.test.shape == (20, 105, 105)
        assert run.train.dtype == run.test.dtype == np.uint8
        assert set(np.unique(run.train)) == {0, 255}
        assert 0 < (run.train == 255).mean() < 0.5  # ink is the minority, so it is 255 as promised
        assert run.train_files == [f"{run.name}/training/class{c:02d}.png" for c in range(1, 21)]
        assert run.test_files == [f"{run.name}/test/item{k:02d}.png" for k in range(1, 21)]
        assert run.answers.dtype == np.int64
        assert sorted(run.answers.tolist()) == list(range(20))  # each class is asked once
    small = load_runs(all_runs, size=28)
    assert small[0].train.shape == (20, 28, 28)
    assert small[0].train.max() == 255  # Lanczos keeps full ink somewhere


@pytest.mark.realdata
def test_mhd_reproduces_lake_2015(all_runs, one_thread):
    runs = load_runs(all_runs)
    score = lake_error(_predict(runs), runs)
    assert score["runs"] == 20
    assert round(score["mean_error"], 1) == 38.8  # Lake, Salakhutdinov & Tenenbaum 2015


@pytest.mark.realdata
def test_runs_answered_one_to_one(all_runs, one_thread):
    """Each run's 20 test items are answered at once, as different characters (the runs' answers
    are a permutation: test_official_runs_layout); the score says so."""
    runs = load_runs(all_runs, size=28)
    joint = evaluate_lake_runs(MHD(), runs, decision="one-to-one")
    expected = []
    for run in runs:
        support = torch.from_numpy(run.train).float().div(255)[:, None]
        query = torch.from_numpy(run.test).float().div(255)[:, None]
        answers = one_to_one(MHD().predict(support, torch.arange(20), query))
        assert sorted(answers.tolist()) == list(range(20))
        expected.append(answers.numpy())
    assert joint == {**lake_error(expected, runs), "decision": "one-to-one", "transductive": True}
    plain = evaluate_lake_runs(MHD(), runs)
    assert (
        "decision" not in plain and plain["per_run"] == lake_error(_predict(runs), runs)["per_run"]
    )


@pytest.mark.realdata
def test_grid_mhd_matches_point_set_definition_on_a_run(all_runs, one_thread):
    run = load_runs(all_runs)[0]
    test, train = torch.from_numpy(run.test[:4] > 127), torch.from_numpy(run.train[:5] > 127)
    reference = torch.tensor(
        [[modified_hausdorff(ink_points(a), ink_points(b)) for b in train] for a in test],
        dtype=torch.float64,
    )
    torch.testing.assert_close(mhd_matrix(test, train), reference, rtol=0, atol=1e-5)


@pytest.mark.realdata
def test_sem_over_alphabets_on_the_official_runs(omniglot_root):
    """Lake's runs are 10 evaluation alphabets x 2 runs, found from the drawings themselves; the
    SEM over alphabets is the sd of the per-alphabet errors / sqrt(10) (Lake's ±)."""
    path = omniglot_root / "omniglot" / "all_runs.zip"
    alphabets = run_alphabets(path, omniglot_root)
    firsts = ["Atlantean", "Ge_ez", "Glagolitic", "Gurmukhi", "Kannada", "Malayalam", "Manipuri"]
    expected = [*firsts, "Old_Church_Slavonic_(Cyrillic)", "Tengwar", "Tibetan"]
    assert alphabets == {f"run{i:02d}": expected[(i - 1) // 2] for i in range(1, 21)}
    runs = load_runs(path, size=28)
    # run i (0-based) gets its first i test items wrong: errors 0, 5, ..., 95 %
    wrong = [np.arange(20) < i for i in range(20)]
    predictions = [np.where(w, (r.answers + 1) % 20, r.answers) for w, r in zip(wrong, runs)]
    score = lake_error(predictions, runs, alphabets)
    assert score["per_run"]["run04"] == 15.0 and score["mean_error"] == pytest.approx(47.5)
    assert score["sem"] == pytest.approx(statistics.stdev(5.0 * i for i in range(20)) / 20**0.5)
    per_alphabet = [10.0 * k + 2.5 for k in range(10)]  # the mean of runs 2k and 2k+1
    assert score["per_alphabet"] == dict(zip(expected, per_alphabet))
    assert score["alphabets"] == 10 and score["run_alphabets"] == alphabets
    assert score["sem_alphabets"] == pytest.approx(statistics.stdev(per_alphabet) / 10**0.5)
    assert run_alphabets(path, omniglot_root / "nowhere") is None  # no evaluation archive


# --- scoring -----------------------------------------------------------------------------------


def _run(name: str, answers: list[int]) -> LakeRun:
    blank = np.zeros((len(answers), 2, 2), dtype=np.uint8)
    return LakeRun(name, blank, blank, np.array(answers, dtype=np.int64), [], [])


def test_lake_error_by_hand():
    runs = [_run("run01", [0, 1, 2, 3]), _run("run02", [3, 2, 1, 0])]
    right = [run.answers for run in runs]
    assert lake_error(right, runs)["mean_error"] == 0.0
    wrong = [(run.answers + 1) % 4 for run in runs]
    assert lake_error(wrong, runs)["mean_error"] == 100.0
    mixed = lake_error([np.array([0, 1, 2, 0]), np.array([3, 0, 0, 1])], runs)
    assert mixed["per_run"] == {"run01": 25.0, "run02": 75.0}
    assert mixed["mean_error"] == 50.0
    assert mixed["sem"] == pytest.approx(25.0)  # std (ddof=1) 35.36 / sqrt(2)
    assert lake_error([right[0]], runs[:1])["sem"] is None
    with pytest.raises(ValueError):
        lake_error(right[:1], runs)


# --- the distance ------------------------------------------------------------------------------


def test_modified_hausdorff_properties():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 3.0]])
    # a -> b: (3 + sqrt(10)) / 2; b -> a: 3; the larger wins.
    assert modified_hausdorff(a, b) == pytest.approx((3 + math.sqrt(10)) / 2)
    assert modified_hausdorff(a, b) == modified_hausdorff(b, a)
    assert modified_hausdorff(a, a) == 0.0
    # The mean (not Hausdorff's max) of the nearest distances: b -> {0} is (0 + 2) / 2.
    assert modified_hausdorff(torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [0.0, 2.0]])) == 1.0


def test_grid_mhd_matches_point_set_definition():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(6, 12, 15, generator=generator) < 0.2
    b = torch.rand(5, 9, 11, generator=generator) < 0.3
    reference = torch.tensor(
        [[modified_hausdorff(ink_points(x), ink_points(y)) for y in b] for x in a],
        dtype=torch.float64,
    )
    torch.testing.assert_close(mhd_matrix(a, b), reference, rtol=0, atol=1e-5)


def test_mhd_is_translation_invariant_and_takes_the_nearest_shot():
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 4:9, 5] = 1.0  # a vertical bar
    shifted = torch.roll(image, shifts=(3, 4), dims=(2, 3))
    bar = torch.zeros_like(image)
    bar[0, 0, 6, 3:12] = 1.0  # a horizontal bar
    support = torch.cat([bar, shifted, bar])
    logits = MHD().predict(support, torch.tensor([0, 0, 1]), image)
    assert logits.shape == (1, 2)
    assert logits[0, 0] == 0.0  # the shifted copy in class 0 wins over class 0's bar
    assert logits[0, 1] < 0.0


def test_mhd_needs_ink():
    with pytest.raises(DataError, match="no ink"):
        MHD().predict(torch.ones(2, 1, 8, 8), torch.tensor([0, 1]), torch.zeros(1, 1, 8, 8))


# --- reading run zips --------------------------------------------------------------------------


def _shapes(size: int = 20) -> list[np.ndarray]:
    """Three distinct strokes: a horizontal bar, a vertical bar and an L."""
    shapes = [np.zeros((size, size), dtype=bool) for _ in range(3)]
    shapes[0][9:11, 3:17] = True
    shapes[1][3:17, 9:11] = True
    shapes[2][3:17, 4:6] = True
    shapes[2][15:17, 4:14] = True
    return shapes


def _write_runs(path: Path, labels: dict[str, str] | None = None) -> None:
    """Two 3-way runs; test items are shifted copies of the classes, in a shuffled order."""
    shapes = _shapes()
    with zipfile.ZipFile(path, "w") as archive:
        for run, order in (("run01", [2, 0, 1]), ("run02", [1, 2, 0])):
            for c, shape in enumerate(shapes, start=1):
                archive.writestr(f"{run}/training/class{c:02d}.png", _png(shape))
            lines = []
            for k, c in enumerate(order, start=1):
                item = np.roll(shapes[c], (k - 2, 2 - k), axis=(0, 1))
                archive.writestr(f"{run}/test/item{k:02d}.png", _png(item))
                lines.append(f"{run}/test/item{k:02d}.png {run}/training/class{c + 1:02d}.png")
            text = (labels or {}).get(run, "\n".join(lines) + "\n")
            archive.writestr(f"{run}/class_labels.txt", text)


def test_decode_png_makes_ink_high():
    shape = _shapes()[0]
    assert np.array_equal(decode_png(_png(shape)), shape.astype(np.uint8) * 255)
    assert decode_png(_png(shape), size=10).shape == (10, 10)


def test_custom_zip_loads_and_scores(tmp_path):
    path = tmp_path / "my_runs.zip"
    _write_runs(path)
    runs = load_runs(path)
    assert [run.name for run in runs] == ["run01", "run02"]
    assert runs[0].train.shape == runs[0].test.shape == (3, 20, 20)
    assert runs[0].answers.tolist() == [2, 0, 1]
    assert runs[1].answers.tolist() == [1, 2, 0]
    assert lake_error(_predict(runs), runs)["mean_error"] == 0.0
    assert load_runs(path, size=12)[1].test.shape == (3, 12, 12)


def test_missing_zip(tmp_path):
    with pytest.raises(DataError, match="not found") as error:
        load_runs(tmp_path / "all_runs.zip")
    assert SOURCE_URL in str(error.value) and str(tmp_path) in str(error.value)


def test_truncated_zip(tmp_path):
    path = tmp_path / "all_runs.zip"
    _write_runs(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_runs(path)


def test_zip_without_labels(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("run01/training/class01.png", _png(_shapes()[0]))
    with pytest.raises(DataError, match="class_labels.txt"):
        load_runs(path)


def test_label_pointing_at_a_missing_image(tmp_path):
    path = tmp_path / "runs.zip"
    _write_runs(path, {"run02": "run02/test/item01.png run02/training/class09.png\n"})
    with pytest.raises(DataError, match="class09.png, which is not in the zip"):
        load_runs(path)


def test_unreadable_png(tmp_path):
    path = tmp_path / "runs.zip"
    _write_runs(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("run01/training/class04.png", b"not a png")
    with pytest.raises(DataError, match="class04.png is not a readable PNG"):
        load_runs(path)
