"""The allocator setting the CLI applies: it must take effect where it can (Linux with glibc)."""

from __future__ import annotations

import platform
import sys

import torch

from metalab.runtime import keep_freed_memory


def test_keep_freed_memory():
    applied = keep_freed_memory()
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied is on_glibc
    x = torch.ones(1 << 20)  # allocation and arithmetic still work afterwards
    assert float((x + x).sum()) == 2.0 * (1 << 20)
