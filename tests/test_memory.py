"""The allocator setting the CLI applies (phalanx/memory.py)."""

import platform
import sys

import pytest

from phalanx.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="a glibc setting")
def test_glibc_accepts_both_thresholds():
    # mallopt answers 0 for a value it refuses (e.g. an mmap threshold above 32 MiB): both must take
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent: the CLI and a library user may both call it
