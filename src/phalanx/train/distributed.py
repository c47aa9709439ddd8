"""Data-parallel training under `torchrun`: one process per device, PyTorch's own collectives.

Design (docs/reliability.md): members are not wrapped in DDP modules. Every rank builds the
same global batch of `train.batch_size` examples (same seed, same permutation), keeps its
contiguous shard, and after `backward` the gradients are all-reduced as the average weighted by
shard size, so a rank-averaged step equals the single-process step on the global batch for any
loss that is a mean over examples. This works for every method, including those that couple
members or draw a second (source) batch. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Rank 0 failed in a step only it does (writing the run directory); the message is its error."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # the collectives' device: cuda:LOCAL_RANK with nccl, cpu with gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        return None if t is None else torch.tensor_split(t, self.world_size)[self.rank]

    def reduce_step(self, params: Sequence[torch.nn.Parameter], weight: float, stats: Sequence[float]
                    ) -> list[float]:
        """Sum `weight * grad` over ranks into each `.grad` (one all-reduce), and `stats` with it.

        A parameter keeps `.grad = None` only when no rank produced a gradient for it, as in a
        single process where the optimizer then skips it.
        """
        parts, has = [], []
        for p in params:
            has.append(p.grad is not None)
            g = p.grad.mul(weight) if p.grad is not None else torch.zeros_like(p)
            parts.append(g.reshape(-1).to(self.device, torch.float32))
        extra = torch.tensor([float(h) for h in has] + list(stats), dtype=torch.float32, device=self.device)
        flat = torch.cat(parts + [extra])
        dist.all_reduce(flat)
        offset = 0
        for p, n in zip(params, (p.numel() for p in params)):
            chunk = flat[offset:offset + n]
            offset += n
            p.grad = chunk.view_as(p).to(p.device, p.dtype).clone()
        tail = flat[offset:].cpu()
        for p, count in zip(params, tail[:len(params)]):
            if count == 0:
                p.grad = None
        return [float(v) for v in tail[len(params):]]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (other ranks pass None)."""
        size = torch.tensor([len(data) if self.is_main and data is not None else 0], dtype=torch.int64,
                            device=self.device)
        dist.broadcast(size, 0)
        buf = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.is_main and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if int(size):
            dist.broadcast(buf, 0)
        return bytes(buf.cpu().numpy())

    def sync_generator(self, gen: torch.Generator) -> None:
        """Give every rank rank 0's generator state (so per-epoch draws, e.g. DVERGE's layer, agree)."""
        state = self.broadcast_bytes(bytes(gen.get_state().numpy()) if self.is_main else None)
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; if it fails, every rank raises (no rank is left waiting)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below on rank 0, reported to the others
                error = exc
        message = self.broadcast_bytes(str(error).encode() if error is not None else None)
        if error is not None:
            raise error
        if message:
            raise RankFailed(f"rank 0 failed: {message.decode()}")
        return result


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


@contextmanager
def process_group(device: torch.device) -> Iterator[DistContext | None]:
    """The process group for this torchrun worker (nccl on CUDA, gloo on CPU), or None when
    not launched by torchrun. Destroyed on exit."""
    found = env_world()
    if found is None:
        yield None
        return
    rank, world, local_rank = found
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    try:
        yield DistContext(rank, world, local_rank, device)
        if owner:
            # no rank tears down while another still talks to it: gloo otherwise aborts the
            # early rank ("terminate called without an active exception"; seen in 2 of 4 runs)
            dist.barrier()
    finally:
        if owner:
            dist.destroy_process_group()
