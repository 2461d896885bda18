"""Files written whole or not at all, and file checksums.

The lowest layer: data caches, downloads, episode sets, checkpoints and ``eval.json`` all write
through :func:`atomic_file`, so a crash or a concurrent writer never leaves a half-written file
where a reader would trust it. Nothing here imports the rest of metalab.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20  # bytes read at a time when hashing


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """A new binary file beside ``path``, renamed onto ``path`` when the block ends normally.

    The temporary name ``<name>.<random>.part`` is unique, so concurrent writers of one path cannot
    mix their bytes (the last rename wins); if the block raises, the partial file is removed and
    ``path`` keeps its old content. Opened with ``"xb"``, so the file gets normal permissions
    (``tempfile.mkstemp`` would give 0600).

    Example:
        >>> with atomic_file(run_dir / "checkpoint.pt") as f:  # doctest: +SKIP
        ...     torch.save(state, f)
    """
    path = Path(path)
    part = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    try:
        with open(part, "xb") as f:
            yield f
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``content`` to ``path`` atomically (see :func:`atomic_file`).

    Args:
        path: the destination; its folder must exist.
        content: bytes, text (written as UTF-8), or a function that writes into the open binary
            file, e.g. ``lambda f: np.save(f, array)``.
    """
    with atomic_file(path) as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)


def file_checksums(
    path: Path | str, algorithms: tuple[str, ...] = ("md5", "sha256")
) -> tuple[str, ...]:
    """The hex digests of a file, one per name in ``algorithms`` (hashlib names), in one read."""
    digests = [hashlib.new(name) for name in algorithms]
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for digest in digests:
                digest.update(chunk)
    return tuple(digest.hexdigest() for digest in digests)
