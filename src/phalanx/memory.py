"""A process-wide allocator setting that makes CPU training faster; the CLI and benchmarks apply it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit systems
_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    PyTorch's CPU allocator caches nothing, and glibc returns blocks over 128 KiB to the
    system when they are freed, so every training step page-faults its activations in again:
    a 3 x seed-Conv DVERGE distillation took 10,000-30,000 minor faults and 10-25% more time
    (benchmarks/RESULTS.md). With higher mmap and trim thresholds the heap keeps them, at the
    cost of holding the process's peak memory until it exits. Returns whether it took effect:
    False off glibc (macOS, musl), where nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
