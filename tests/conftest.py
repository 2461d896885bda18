"""Shared fixtures. Real-data tests read the data root (CI: METALAB_DATA=../shared/data); they are
skipped on a machine without the files, and fail under CI, where the data must be there.

A test that uses a data fixture (directly or through another fixture) must carry
``@pytest.mark.realdata``, so that ``-m "not realdata"`` runs without data: an unmarked one fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metalab.data.root import data_root

DATA_FIXTURES = frozenset({"omniglot_root", "mnist_root", "require_data"})


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of
    the cores as torch threads: two workers of two threads each on two cores would stall their
    thread pools (see one_thread)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture is set up (a missing file would skip first): data tests are marked."""
    used = DATA_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used and item.get_closest_marker("realdata") is None:
        pytest.fail(f"{item.nodeid} uses {sorted(used)}: mark it @pytest.mark.realdata")


def _require(paths: list[str]) -> Path:
    """The data root if it holds every path; else skip, or fail under CI (env CI set)."""
    root = data_root()
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        message = f"{missing[0]} not under {root}: set METALAB_DATA (CI uses ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def require_data():
    """``require_data(paths)``: the data root holding those files (skip, or fail under CI)."""
    return _require


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """A data root holding the Omniglot archives and the Vinyals split files."""
    return _require(
        [
            "omniglot/images_background.zip",
            "omniglot/images_evaluation.zip",
            "omniglot/all_runs.zip",
        ]
        + [f"omniglot/splits/vinyals/{p}.txt" for p in ("train", "val", "trainval", "test")]
    )


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding the four MNIST idx files."""
    return _require(
        [f"mnist/{p}-ubyte.gz" for p in ("train-images-idx3", "train-labels-idx1")]
        + [f"mnist/{p}-ubyte.gz" for p in ("t10k-images-idx3", "t10k-labels-idx1")]
    )


@pytest.fixture
def offline(monkeypatch):
    """No download may leave the machine: every fetch goes to a closed local port."""
    monkeypatch.setenv("METALAB_MIRROR", "http://127.0.0.1:9")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: small kernels (float64 graphs, MHD)
    on a busy 2-core machine wait on a descheduled pool thread, 10-40x slower than one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
