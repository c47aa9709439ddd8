"""The one training loop every method shares: data, optimizer, schedule, logging, checkpoints, resume."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
import contextlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from phalanx.checkpoint import (
    Checkpoint, CheckpointError, checkpoint_from_bytes, discard_incomplete, latest_checkpoint, pack_members,
    pack_optimizer, save_checkpoint, unpack_members, unpack_optimizer,
)
from phalanx.config import DEVICE_RULE, ConfigError, OptimConfig, RunConfig, fingerprint, to_mapping, valid_device
from phalanx.data import Augment, DeviceBatches, dataset_info, load_dataset, train_val_split
from phalanx.files import DamagedFileError, append_jsonl, loads_checked, remove_temp_files, write_text_atomic
from phalanx.tensorboard import TensorboardLog
from phalanx.models import Classifier, mixture_log_probs
from phalanx.runs import (
    RunDirError, build_members, check_identity, check_run_dir, checkpoint_dir, load_members, locked, metrics_path,
    prepare_run_dir, read_run_config,
)
from phalanx.train.api import Batch
from phalanx.train.distributed import DistContext, process_group
from phalanx.train.registry import build_method


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if not valid_device(name):
        raise ConfigError(f"device = {name!r} is not allowed; expected {DEVICE_RULE}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} asked for, but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `train.precision` (a no-op for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(epoch: int, base_lr: float, cfg: OptimConfig, epochs: int) -> float:
    """Learning rate for a 0-based epoch: constant, step (x gamma at each milestone) or cosine."""
    if cfg.schedule == "step":
        return base_lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return base_lr


def make_optimizer(members: Sequence[Classifier], cfg: OptimConfig,
                   extra: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """One optimizer, one parameter group per member: per-parameter updates equal N separate optimizers.

    `extra` (a method's own trainable parameters, if any) becomes one more group, last, with the
    same hyper-parameters.
    """
    groups = [{"params": list(m.parameters())} for m in members]
    if extra:
        groups.append({"params": list(extra)})
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class SplitData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_source: str


def load_training_data(cfg: RunConfig) -> SplitData:
    """Training split (optionally subset) and the validation set: held out, or the test split."""
    d = cfg.data
    x, y = load_dataset(d.dataset, "train", d.root, download=d.download, allow_noncanonical=d.allow_noncanonical)
    if d.train_subset is not None:
        x, y = x[: d.train_subset], y[: d.train_subset]
    if d.val_size > 0:
        tx, ty, vx, vy = train_val_split(x, y, d.val_size, cfg.seed, head=d.val_from == "head")
        return SplitData(tx, ty, vx, vy, "train-holdout")
    vx, vy = load_dataset(d.dataset, "test", d.root, download=d.download, allow_noncanonical=d.allow_noncanonical)
    return SplitData(x, y, vx, vy, "test")


@torch.no_grad()
def validate(members: Sequence[Classifier], x_u8: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 1000) -> dict[str, Any]:
    """Loss and accuracy of each member and of the mixture on a uint8 image set."""
    modes = [m.training for m in members]
    for m in members:
        m.eval()
    logits = []
    for start in range(0, len(y), batch_size):
        xb = x_u8[start:start + batch_size].to(device).float().div_(255)
        logits.append(torch.stack([m(xb) for m in members]))
    for m, mode in zip(members, modes):
        m.train(mode)
    all_logits = torch.cat(logits, dim=1)
    y = y.to(device)
    mix = mixture_log_probs(all_logits)
    return {
        "member_loss": [float(F.cross_entropy(lg, y)) for lg in all_logits],
        "member_acc": [float((lg.argmax(1) == y).float().mean()) for lg in all_logits],
        "mixture_loss": float(F.nll_loss(mix, y)),
        "mixture_acc": float((mix.argmax(1) == y).float().mean()),
    }


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, tensorboard: bool = False) -> Path:
    """Train the ensemble described by `cfg` into `run_dir`, resuming from its last checkpoint.

    Under `torchrun` every rank calls this: data-parallel training (phalanx.train.distributed),
    with rank 0 alone writing `run_dir`. `tensorboard`: also log the metrics to
    `run_dir/tensorboard` (needs the tensorboard package).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    # Every check runs before the first byte is written: a refused command leaves nothing behind.
    check_run_dir(run_dir, cfg)
    method = build_method(cfg.train.method, cfg.method)
    if cfg.train.init_from:
        _check_init_from(cfg)
    data = load_training_data(cfg)
    if cfg.train.batch_size > len(data.train_y):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the training set "
                          f"({len(data.train_y)} examples); use at most {len(data.train_y)}")
    members = _initial_members(cfg)
    with process_group(device) as ctx:
        if ctx is not None and cfg.train.batch_size < ctx.world_size:
            raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is the global batch, split across "
                              f"{ctx.world_size} processes; use at least {ctx.world_size}")
        with ExitStack() as stack:
            if ctx is None:
                stack.enter_context(locked(run_dir))
                _prepare(run_dir, cfg)
            else:
                ctx.on_main(lambda: (stack.enter_context(locked(run_dir)), _prepare(run_dir, cfg)))
            board = None
            if tensorboard and (ctx is None or ctx.is_main):
                board = TensorboardLog(run_dir / TENSORBOARD_DIR)
                stack.callback(board.close)
            start = _Start(data, method, members)
            if ctx is None:
                return _train_locked(cfg, run_dir, progress, device, None, start, board)
            return _train_locked(cfg, run_dir, progress and ctx.is_main, ctx.device, ctx, start, board)


TENSORBOARD_DIR = "tensorboard"


@dataclass
class _Start:
    """What `train` validated before writing anything: the data, the method, the initial members."""

    data: SplitData
    method: Any
    members: list[Classifier]


def _check_init_from(cfg: RunConfig) -> None:
    """Refuse a `train.init_from` run that cannot start this one: not a run, or another architecture,
    member count or dataset (hence classes and input shape)."""
    source = cfg.train.init_from
    try:
        other = read_run_config(source)
    except (RunDirError, ConfigError, CheckpointError) as exc:
        raise ConfigError(f"train.init_from = {source!r} is not allowed: {exc}") from None
    diffs = [f"{key} = {mine!r} here, {theirs!r} there" for key, mine, theirs in (
        ("model.arch", cfg.model.arch, other.model.arch), ("model.members", cfg.model.members, other.model.members),
        ("data.dataset", cfg.data.dataset, other.data.dataset)) if mine != theirs]
    if diffs:
        raise ConfigError(f"train.init_from = {source!r} is not allowed: that run does not fit this one "
                          f"({'; '.join(diffs)}); expected a run of the same architecture, member count and dataset")


def _initial_members(cfg: RunConfig) -> list[Classifier]:
    """Freshly seeded members, or those of `train.init_from` (checked by `_check_init_from`)."""
    if not cfg.train.init_from:
        return build_members(cfg, dataset_info(cfg.data.dataset, cfg.data.root).spec)
    try:
        members, _, _ = load_members(cfg.train.init_from, "cpu")
    except (RunDirError, ConfigError, CheckpointError) as exc:
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r} is not allowed: {exc}") from None
    return members


def _prepare(run_dir: Path, cfg: RunConfig) -> None:
    """Create or accept the run directory and clear what a killed write left (under the lock)."""
    prepare_run_dir(run_dir, cfg)
    remove_temp_files(run_dir)
    discard_incomplete(checkpoint_dir(run_dir))


@dataclass
class _EpochProgress:
    """Where an epoch stands: batches done, their loss sums, time spent, the rng before start_epoch,
    and the sums of the method's per-batch extras (GAL, coherence, DVERGE's diversity loss, ...)."""

    batch: int
    sums: list[float]
    seconds: float
    rng_epoch_start: torch.Tensor
    extra_sums: dict[str, float] = field(default_factory=dict)


def _train_locked(cfg: RunConfig, run_dir: Path, progress: bool, device: torch.device,
                  ctx: DistContext | None, start: _Start, board: TensorboardLog | None = None) -> Path:
    info = dataset_info(cfg.data.dataset, cfg.data.root)
    data, method = start.data, start.method
    members = [m.to(device) for m in start.members]
    extra = _method_parameters(method, members, cfg.seed, device)
    params = [p for m in members for p in m.parameters()] + extra
    optimizer = make_optimizer(members, cfg.optim, extra)
    rng = torch.Generator(device=device)
    rng.manual_seed(cfg.seed)

    a = cfg.data.augment
    augment = Augment(crop_padding=a.crop_padding, flip=a.flip, noise_std=a.noise_std, noise=a.noise)
    batches = DeviceBatches(data.train_x, data.train_y, cfg.train.batch_size, device=device,
                            augment=augment, seed=cfg.seed)
    start_epoch, resume = 0, None
    ckpt = _resume_checkpoint(run_dir, ctx)
    if ckpt is not None:
        check_identity(run_dir, cfg, ckpt)
        if "optimizer" not in ckpt.meta or "rng.method" not in ckpt.tensors:
            raise CheckpointError(f"checkpoint {ckpt.path} lacks the optimizer or generator state a resume needs "
                                  "(damaged, or not written by phalanx train)")
        unpack_members(ckpt.tensors, members)
        if hasattr(method, "load_state_dict"):  # before the optimizer: its state covers these parameters
            method.load_state_dict({k[len(_METHOD):]: v for k, v in ckpt.tensors.items() if k.startswith(_METHOD)})
        unpack_optimizer(optimizer, ckpt.tensors, ckpt.meta["optimizer"])
        rng.set_state(ckpt.tensors["rng.method"].to(torch.uint8).cpu())
        start_epoch = ckpt.meta["epoch"]
        partial = ckpt.meta.get("partial")
        if partial is not None:
            batches.load_state_dict(partial["batches"])
            resume = _EpochProgress(batches.state_dict()["batch"], list(partial["member_loss_sums"]),
                                    float(partial["seconds"]), ckpt.tensors["rng.epoch_start"].to(torch.uint8).cpu(),
                                    dict(partial.get("extra_sums", {})))
    if ctx is None or ctx.is_main:
        _keep_metrics_through(metrics_path(run_dir), start_epoch)
    for m in members:
        m.train()

    every = cfg.train.checkpoint_every_steps
    for epoch in range(start_epoch, cfg.train.epochs):
        started = time.perf_counter()
        lr_now = lr_at(epoch, cfg.optim.lr, cfg.optim, cfg.train.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        if ctx is not None:
            ctx.sync_generator(rng)
        if resume is not None:
            # Replay start_epoch from the state it saw (it may draw, e.g. DVERGE's layer), then go on
            # with the step stream where the checkpoint left it.
            now = rng.get_state()
            rng.set_state(resume.rng_epoch_start)
            epoch_log = method.start_epoch(epoch, members, rng)
            rng.set_state(now)
            state, resume = resume, None
        else:
            state = _EpochProgress(0, [0.0] * len(members), 0.0, rng.get_state())
            epoch_log = method.start_epoch(epoch, members, rng)
        sums, steps, extra_sums = state.sums, state.batch, state.extra_sums
        stream = (batches.epoch_pairs(epoch, start_batch=steps) if method.needs_source_batch
                  else batches.epoch(epoch, start_batch=steps))
        bar = tqdm(stream, total=len(batches), initial=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=not (progress and sys.stderr.isatty()), unit="batch")
        # outside a terminal (a pipe, a CI log) the bar would redraw into hundreds of lines: the
        # one line per epoch below is the progress there
        for item in bar:
            batch = Batch(*item)
            if ctx is None:
                with autocast(device, cfg.train.precision):
                    out = method.loss(members, batch, rng)
                if not torch.isfinite(out.loss):
                    _diverged(float(out.loss.detach()), epoch, steps, run_dir)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                member_losses, extras = out.member_losses, out.extras
            else:
                member_losses, extras = _distributed_backward(ctx, method, members, params, optimizer, batch, rng,
                                                              epoch, steps, run_dir, cfg.train.precision)
            optimizer.step()
            sums = [s + v for s, v in zip(sums, member_losses)]
            for key, value in extras.items():
                extra_sums[key] = extra_sums.get(key, 0.0) + value
            steps += 1
            if progress:
                bar.set_postfix(loss=f"{sum(sums) / steps / len(members):.3f}")
            if board is not None:
                board.batch_loss(epoch * len(batches) + steps, sum(sums) / steps / len(members),
                                 epoch_end=steps == len(batches))
            if every and (epoch * len(batches) + steps) % every == 0 and steps < len(batches):
                done = _EpochProgress(steps, sums, state.seconds + time.perf_counter() - started,
                                      state.rng_epoch_start, extra_sums)
                _on_main(ctx, lambda: _save(run_dir, cfg, epoch, members, optimizer, rng, info.name,
                                            method=method, progress=done, batches=batches.state_dict()))
        train_seconds = state.seconds + time.perf_counter() - started

        def finish_epoch() -> dict[str, Any]:
            val = validate(members, data.val_x, data.val_y, device)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "lr": lr_now, "train_loss": [s / max(steps, 1) for s in sums],
                **{f"train_{k}": v / max(steps, 1) for k, v in extra_sums.items()},
                **{f"val_{k}": v for k, v in val.items()}, "val_source": data.val_source,
                "epoch_seconds": train_seconds, **epoch_log,
            }
            every_diag = cfg.train.diagnostics_every
            if every_diag and (epoch + 1) % every_diag == 0 and hasattr(method, "diagnostics"):
                record["diagnostics"] = method.diagnostics(members, data.val_x, data.val_y, rng)
            append_jsonl(metrics_path(run_dir), record)
            if board is not None:
                board.epoch(record)
            _save(run_dir, cfg, epoch + 1, members, optimizer, rng, info.name, method=method)
            return record

        record = _on_main(ctx, finish_epoch)
        if progress and record is not None:
            tqdm.write(_epoch_line(record))
    return run_dir


def _on_main(ctx: DistContext | None, fn: Any) -> Any:
    return fn() if ctx is None else ctx.on_main(fn)


def _diverged(value: float, epoch: int, steps: int, run_dir: Path) -> None:
    raise TrainingDiverged(f"loss became {value} at epoch {epoch + 1}, step {steps + 1}; "
                           f"the last good checkpoint is kept in {checkpoint_dir(run_dir)}")


def _distributed_backward(ctx: DistContext, method: Any, members: Sequence[Classifier],
                          params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, batch: Batch,
                          rng: torch.Generator, epoch: int, steps: int, run_dir: Path,
                          precision: str = "float32") -> tuple[list[float], dict[str, float]]:
    """This rank's share of one step: loss and gradients on its shard, then the global average.

    Weighting each rank's mean-reduced gradient by its share of the global batch and summing
    gives the gradient of the global-batch mean, as a single process would compute it. Returns the
    global member losses and this rank's own extras (logged by rank 0: its shard's values).
    """
    local = Batch(ctx.shard(batch.x), ctx.shard(batch.y), ctx.shard(batch.x_source), ctx.shard(batch.y_source))
    weight = len(local.y) / len(batch.y)
    optimizer.zero_grad(set_to_none=True)
    member_losses, bad, extras = [0.0] * len(members), 0.0, {}
    if len(local.y):
        with autocast(ctx.device, precision):
            out = method.loss(members, local, rng)
        if torch.isfinite(out.loss):
            out.loss.backward()
            member_losses, extras = [v * weight for v in out.member_losses], out.extras
        else:
            bad = 1.0
    reduced = ctx.reduce_step(params, weight, [bad, *member_losses])
    if reduced[0]:
        _diverged(float("nan"), epoch, steps, run_dir)
    return reduced[1:], extras


_METHOD = "method."  # checkpoint key prefix of a method's own tensors


def _method_parameters(method: Any, members: Sequence[Classifier], seed: int,
                       device: torch.device) -> list[torch.nn.Parameter]:
    """A method's own trainable parameters (`extra_parameters(members)`, e.g. RRM's projections),
    built once the members are on `device`; [] for methods without any.

    They are initialized from a seed of their own, so a run (and every torchrun rank) gets the
    same ones whatever drew from torch's global generator before.
    """
    if not hasattr(method, "extra_parameters"):
        return []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1000 + 999)
        return list(method.extra_parameters(members))


def _resume_checkpoint(run_dir: Path, ctx: DistContext | None) -> Checkpoint | None:
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


def _save(run_dir: Path, cfg: RunConfig, epoch: int, members: Sequence[Classifier],
          optimizer: torch.optim.Optimizer, rng: torch.Generator, dataset: str, *, method: Any = None,
          progress: _EpochProgress | None = None, batches: dict[str, int] | None = None) -> None:
    """A checkpoint after `epoch` epochs, or, with `progress`, part way through the next one.

    A method with a `state_dict()` (its own trained tensors) has them saved under `method.`.
    """
    spec = dataset_info(cfg.data.dataset, cfg.data.root).spec
    optim_tensors, optim_plain = pack_optimizer(optimizer)
    tensors = {**pack_members(members), **optim_tensors, "rng.method": rng.get_state()}
    if hasattr(method, "state_dict"):
        tensors.update({f"{_METHOD}{k}": v for k, v in method.state_dict().items()})
    meta: dict[str, Any] = {
        "arch": cfg.model.arch, "dataset": dataset, "method": cfg.train.method, "members": len(members),
        "classes": spec.num_classes, "input_shape": [spec.channels, spec.size, spec.size],
        "fingerprint": fingerprint(cfg), "optimizer": optim_plain,
        "config": to_mapping(cfg),
    }
    batch = 0
    if progress is not None:
        batch = progress.batch
        tensors["rng.epoch_start"] = progress.rng_epoch_start
        # floats survive JSON exactly (repr round-trips), so the resumed epoch logs the same loss
        meta["partial"] = {"batches": batches, "member_loss_sums": progress.sums, "seconds": progress.seconds,
                           "extra_sums": progress.extra_sums}
    save_checkpoint(checkpoint_dir(run_dir), epoch, tensors, meta, keep=cfg.train.keep_checkpoints, batch=batch)


def _keep_metrics_through(path: Path, epoch: int) -> None:
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
            raise DamagedFileError(f"line {number} of {path} is damaged: not JSON; {_REFUSE_DAMAGED_LOG}") from None
        except DamagedFileError as exc:
            raise DamagedFileError(f"{exc}; {_REFUSE_DAMAGED_LOG}") from None
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


_REFUSE_DAMAGED_LOG = ("refusing to resume over it (the log is kept as it is): restore or delete that line, "
                       "or move the run directory away to retrain it")


def _epoch_line(record: dict[str, Any]) -> str:
    members = " ".join(f"{a:.3f}" for a in record["val_member_acc"])
    extra = f" layer={record['layer']}" if "layer" in record else ""
    return (f"epoch {record['epoch']:3d}  train loss {sum(record['train_loss']) / len(record['train_loss']):.4f}  "
            f"val acc mixture {record['val_mixture_acc']:.3f} members [{members}]  "
            f"{record['epoch_seconds']:.1f}s{extra}")
