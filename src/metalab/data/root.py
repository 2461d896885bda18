"""Where data and derived caches live: ``--data-root`` > ``METALAB_DATA`` > ``~/.cache/metalab``."""

from __future__ import annotations

import os
from pathlib import Path


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: an explicit path (the ``--data-root`` flag), else ``METALAB_DATA``, else
    ``~/.cache/metalab``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("METALAB_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "metalab"


def cache_dir() -> Path:
    """Where decoded arrays and fixed episode sets are cached: ``METALAB_CACHE`` or
    ``~/.cache/metalab/derived``. Kept apart from the data root, which may be read-only."""
    env = os.environ.get("METALAB_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "metalab" / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path
