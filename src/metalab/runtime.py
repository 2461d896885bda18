"""Process-wide settings that make the CPU paths fast, applied by the CLI and the benchmarks.

glibc returns every freed block above 128 KiB to the kernel (``munmap``) and gets fresh zeroed pages
for the next one. A training step allocates and frees the same few-MB activation buffers hundreds of
times, so the process spent a third of its time in the kernel (28-minute ProtoNet run: 17 min of
system time). Keeping freed memory in the heap for reuse took a ProtoNet step (60-way 5-shot,
bf16) from 219 to 154 ms on the 2-core CI machine (benchmarks/RESULTS.md). The price: peak resident
memory rose from 0.7 to 1.0 GiB in that benchmark, and the process keeps it until exit.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks below ``threshold`` bytes from the heap and never trim it.

    Returns True when applied; False (and nothing changes) on another platform or C library.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold)
    )
