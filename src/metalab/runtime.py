"""Process-wide settings that make the CPU paths fast, applied by the CLI and the benchmarks.

glibc returns every freed block above 128 KiB to the kernel (``munmap``) and gets fresh zeroed pages
for the next one. A training step allocates and frees the same few-MB activation buffers hundreds of
times, so the process spent a third of its time in the kernel (28-minute ProtoNet run: 17 min of
system time). Keeping freed memory in the heap for reuse took a ProtoNet step (60-way 5-shot,
bf16) from 219 to 154 ms on the 2-core CI machine (benchmarks/RESULTS.md). The price: peak resident
memory rose from 0.7 to 1.0 GiB in that benchmark, and the process keeps it until exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' defaults
_kept: int | None = None  # the threshold keep_freed_memory applied, if it did


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks below ``threshold`` bytes from the heap and never trim it.

    Returns True when applied; False (and nothing changes) on another platform or C library.
    """
    global _kept
    applied = _mallopt(threshold)
    _kept = threshold if applied else None
    return applied


def _mallopt(threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold)
    )


@contextlib.contextmanager
def return_freed_memory() -> Iterator[None]:
    """Within: glibc's default thresholds, so that freed blocks above 128 KiB go back to the
    kernel and the resident size follows the memory in use (to measure a step's peak); then
    :func:`keep_freed_memory`'s again if it was applied."""
    kept = _kept
    if kept is not None:
        _mallopt(_GLIBC_DEFAULT)
    try:
        yield
    finally:
        if kept is not None:
            _mallopt(kept)


def trim_heap() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc ``malloc_trim``); False where
    that is not possible. A process that keeps freed memory (:func:`keep_freed_memory`) and
    waits for a while calls it so that it does not hold its peak while others run."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    """This process's peak resident memory since it started or since :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Restart the peak (Linux >= 4.0: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
