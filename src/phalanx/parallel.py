"""Independent pieces of CPU work run on several cores at once, one core each.

Why: a seed-Conv member's tensors at batch 128 are too small for PyTorch's intra-op threads
to keep two cores busy (each op splits, then waits for its slowest half). Independent work
units (one member's distillation on one slice of the batch) run whole on one thread each
scale better: benchmarks/RESULTS.md. Kernels release the GIL, so plain Python threads do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per size: creating threads at every step would cost more than it saves."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phalanx-cpu")
    return _pools[workers]


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """PyTorch ops use one intra-op thread inside the block (each worker thread owns a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_on_cores(fn: Callable[[T], R], units: Sequence[T], workers: int) -> list[R]:
    """`[fn(u) for u in units]`, computed by `workers` threads of one intra-op thread each.

    Results come back in the order of `units`. With `workers` <= 1 or a single unit, a plain
    loop in the calling thread (same results, no threads).
    """
    if workers <= 1 or len(units) <= 1:
        return [fn(u) for u in units]
    with single_threaded_ops():
        return list(_pool(workers).map(fn, units))
