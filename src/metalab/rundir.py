"""The run directory: what a training run leaves on disk, and how it is read back.

A run directory holds ``config.json`` (the method and its config), ``checkpoint.pt`` (latest) and
``best.pt`` (best validation score), ``metrics.jsonl``, TensorBoard events in ``tb/`` and, after
``metalab eval``, ``eval.json``. Checkpoints and ``config.json`` are written atomically
(:func:`metalab.io.atomic_file`); a checkpoint carries the optimizer, scheduler and every random
generator, so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

import torch

from metalab.errors import CheckpointError
from metalab.io import atomic_file, atomic_write
from metalab.methods import METHODS, get_method
from metalab.methods.base import Method, MethodConfig


def write_config(run_dir: Path, method_name: str, config: MethodConfig) -> None:
    """``config.json``: the method's name and every config field, readable without torch."""
    text = json.dumps({"method": method_name, **asdict(config)}, indent=2) + "\n"
    atomic_write(Path(run_dir) / "config.json", text)


def save_checkpoint(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_checkpoint(
    path: Path, method_name: str | None = None, known: Collection[str] | None = None
) -> dict:
    """Read a checkpoint, checking it is one of ours (and of ``method_name`` when given), of a
    method in ``known`` (default: the episodic methods' registry)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: train first or check the run directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "method" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path} is not a metalab checkpoint")
    if method_name is not None and checkpoint["method"] != method_name:
        raise CheckpointError(
            f"{path} is a {checkpoint['method']!r} checkpoint, not {method_name!r}: "
            f"use `metalab train {checkpoint['method']} --resume` or another --run-dir"
        )
    if checkpoint["method"] not in (METHODS if known is None else known):
        raise CheckpointError(f"{path} holds unknown method {checkpoint['method']!r}")
    return checkpoint


def load_method(path: Path, method_name: str | None = None) -> tuple[Method, dict]:
    """Rebuild a trained method from a checkpoint; returns it (in eval mode) and the checkpoint."""
    checkpoint = load_checkpoint(path, method_name)
    cls = get_method(checkpoint["method"])
    config = cls.Config(**checkpoint["config"])
    method = cls(config)
    try:
        method.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit {cls.name} with its saved config: {first}"
        ) from None
    return method.eval(), checkpoint
