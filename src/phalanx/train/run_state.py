"""A run's training state on disk: the checkpoints the loop writes and resumes from, and the
metrics log kept consistent with them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phalanx.checkpoint import (
    Checkpoint, CheckpointError, checkpoint_from_bytes, latest_checkpoint, pack_members, pack_optimizer,
    save_checkpoint, unpack_members, unpack_optimizer,
)
from phalanx.config import RunConfig, fingerprint, to_mapping
from phalanx.data import DeviceBatches
from phalanx.files import DamagedFileError, loads_checked, write_text_atomic
from phalanx.models import Classifier, InputSpec
from phalanx.runs import check_identity, checkpoint_dir
from phalanx.train.distributed import DistContext

METHOD_PREFIX = "method."  # checkpoint key prefix of a method's own tensors


@dataclass
class EpochProgress:
    """Where an epoch stands: batches done, their loss sums, time spent, the rng before start_epoch,
    and the sums of the method's per-batch extras (GAL, coherence, DVERGE's diversity loss, ...)."""

    batch: int
    sums: torch.Tensor  # float64 (members,), on the training device
    seconds: float
    rng_epoch_start: torch.Tensor
    extra_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 scalars


def sum_tensor(values: Any, device: torch.device) -> torch.Tensor:
    """Loss sums as a float64 tensor on the training device (from a checkpoint's exact floats)."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def restore(run_dir: Path, cfg: RunConfig, ckpt: Checkpoint | None, members: Sequence[Classifier], method: Any,
            optimizer: torch.optim.Optimizer, rng: torch.Generator, batches: DeviceBatches,
            device: torch.device) -> tuple[int, EpochProgress | None]:
    """Load a checkpoint's members, method state, optimizer, generator and batch position (nothing
    when `ckpt` is None); returns the epoch to start at and, for a checkpoint taken mid-epoch,
    where that epoch stands."""
    if ckpt is None:
        return 0, None
    check_identity(run_dir, cfg, ckpt)
    if "optimizer" not in ckpt.meta or "rng.method" not in ckpt.tensors:
        raise CheckpointError(f"checkpoint {ckpt.path} lacks the optimizer or generator state a resume needs "
                              "(damaged, or not written by phalanx train)")
    unpack_members(ckpt.tensors, members)
    # before the optimizer: its state covers these parameters
    method.load_state_dict({k[len(METHOD_PREFIX):]: v for k, v in ckpt.tensors.items() if k.startswith(METHOD_PREFIX)})
    unpack_optimizer(optimizer, ckpt.tensors, ckpt.meta["optimizer"])
    rng.set_state(ckpt.tensors["rng.method"].to(torch.uint8).cpu())
    partial = ckpt.meta.get("partial")
    if partial is None:
        return ckpt.meta["epoch"], None
    batches.load_state_dict(partial["batches"])
    return ckpt.meta["epoch"], EpochProgress(
        batches.state_dict()["batch"], sum_tensor(partial["member_loss_sums"], device), float(partial["seconds"]),
        ckpt.tensors["rng.epoch_start"].to(torch.uint8).cpu(),
        {k: sum_tensor(v, device) for k, v in partial.get("extra_sums", {}).items()})


def resume_checkpoint(run_dir: Path, ctx: DistContext | None) -> Checkpoint | None:
    """The checkpoint to resume from; under torchrun rank 0 reads it and sends it to the others,
    so the run directory need not be visible from every node."""
    if ctx is None:
        return latest_checkpoint(checkpoint_dir(run_dir))
    ckpt = latest_checkpoint(checkpoint_dir(run_dir)) if ctx.is_main else None
    meta = ctx.broadcast_bytes(json.dumps(ckpt.meta).encode() if ckpt is not None else None)
    if not meta:
        return None
    blob = ctx.broadcast_bytes(ckpt.path.with_suffix(".safetensors").read_bytes() if ckpt is not None else None)
    return checkpoint_from_bytes(json.loads(meta), blob, checkpoint_dir(run_dir))


def save_run_checkpoint(run_dir: Path, cfg: RunConfig, epoch: int, members: Sequence[Classifier],
          optimizer: torch.optim.Optimizer, rng: torch.Generator, spec: InputSpec, dataset: str, *, method: Any = None,
          progress: EpochProgress | None = None, batches: dict[str, int] | None = None) -> None:
    """A checkpoint after `epoch` epochs, or, with `progress`, part way through the next one.

    A method with a `state_dict()` (its own trained tensors) has them saved under `method.`.
    The input spec is kept, so that members rebuild without their dataset (`runs.load_members`).
    """
    optim_tensors, optim_plain = pack_optimizer(optimizer)
    tensors = {**pack_members(members), **optim_tensors, "rng.method": rng.get_state()}
    if method is not None:
        tensors.update({f"{METHOD_PREFIX}{k}": v for k, v in method.state_dict().items()})
    meta: dict[str, Any] = {
        "arch": cfg.model.label, "dataset": dataset, "method": cfg.train.method, "members": len(members),
        "classes": spec.num_classes, "input_shape": [spec.channels, spec.size, spec.size],
        "input_spec": dataclasses.asdict(spec),
        "fingerprint": fingerprint(cfg), "optimizer": optim_plain,
        "config": to_mapping(cfg),
    }
    batch = 0
    if progress is not None:
        batch = progress.batch
        tensors["rng.epoch_start"] = progress.rng_epoch_start
        # floats survive JSON exactly (repr round-trips), so the resumed epoch logs the same loss
        meta["partial"] = {"batches": batches, "member_loss_sums": progress.sums.tolist(), "seconds": progress.seconds,
                           "extra_sums": {k: float(v) for k, v in progress.extra_sums.items()}}
    save_checkpoint(checkpoint_dir(run_dir), epoch, tensors, meta, keep=cfg.train.keep_checkpoints, batch=batch)


def keep_metrics_through(path: Path, epoch: int) -> None:
    """Drop metric lines past the checkpoint we resume from (written before a crash), and a line
    torn by a kill during its write, so that each epoch is logged once.

    A kill can leave at most one epoch logged past the newest checkpoint (its line is written just
    before its checkpoint), and a torn line only as the last, unterminated one. More epochs mean
    checkpoints were lost, and any other damaged line (not JSON, or not matching its checksum) is a
    record that cannot be trusted: either way the log is kept as it is and the resume refused.
    """
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    raw = text.splitlines()
    lines, logged = [], 0
    for number, ln in enumerate(raw, start=1):
        if not ln.strip():
            continue
        try:
            record = loads_checked(ln, f"line {number} of {path}")
        except json.JSONDecodeError:
            if number == len(raw) and not text.endswith("\n"):
                continue  # torn by a kill during its write
            raise DamagedFileError(f"line {number} of {path} is damaged: not JSON; {REFUSE_DAMAGED_LOG}") from None
        except DamagedFileError as exc:
            raise DamagedFileError(f"{exc}; {REFUSE_DAMAGED_LOG}") from None
        if not isinstance(record, dict):
            continue
        number = record.get("epoch", 0)
        if isinstance(number, bool) or not isinstance(number, int):
            lines.append(ln)  # not an epoch line of ours: kept as it is
            continue
        logged = max(logged, number)
        if number <= epoch:
            lines.append(ln)
    if logged > epoch + 1:
        raise CheckpointError(f"{path} records epoch {logged} but the newest checkpoint in {path.parent / 'checkpoints'} "
                              f"is at epoch {epoch}: checkpoints were lost; refusing to train over the log (move the "
                              "run directory away to retrain it)")
    kept = "".join(ln + "\n" for ln in lines)
    if kept != text:
        write_text_atomic(path, kept)


REFUSE_DAMAGED_LOG = ("refusing to resume over it (the log is kept as it is): restore or delete that line, "
                       "or move the run directory away to retrain it")
