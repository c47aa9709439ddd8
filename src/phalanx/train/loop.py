"""The one training loop every method shares: data, optimizer, schedule, logging, checkpoints, resume."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from phalanx.checkpoint import CheckpointError, discard_incomplete
from phalanx.config import ConfigError, RunConfig
from phalanx.device import autocast, resolve_device
from phalanx.data import Augment, DeviceBatches, dataset_info
from phalanx.data.splits import SplitData, load_training_data
from phalanx.files import append_jsonl, remove_temp_files
from phalanx.tensorboard import TensorboardLog
from phalanx.models import Classifier, InputSpec
from phalanx.runs import (
    RunDirError, build_members, check_run_dir, checkpoint_dir, load_members, locked, metrics_path,
    prepare_run_dir, read_run_config,
)
from phalanx.train.api import Batch
from phalanx.train.distributed import DistContext, process_group
from phalanx.train.optimization import lr_at, make_optimizer, method_parameters
from phalanx.train.registry import build_method
from phalanx.train.run_state import (
    EpochProgress, keep_metrics_through, restore, resume_checkpoint, save_run_checkpoint as _save, sum_tensor,
)
from phalanx.train.validation import validate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class GivenData:
    """Training data passed in (the Python API's tensors) instead of read from `cfg.data`."""

    split: SplitData
    spec: InputSpec
    name: str


def train(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, tensorboard: bool = False,
          members: Sequence[Classifier] | None = None, data: GivenData | None = None) -> Path:
    """Train the ensemble described by `cfg` into `run_dir`, resuming from its last checkpoint.

    Under `torchrun` every rank calls this: data-parallel training (phalanx.train.distributed),
    with rank 0 alone writing `run_dir`. `tensorboard`: also log the metrics to
    `run_dir/tensorboard` (needs the tensorboard package). `members` (trained in place) and
    `data` replace those that `cfg` describes (the Python API, phalanx.api).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    # Every check runs before the first byte is written: a refused command leaves nothing behind.
    check_run_dir(run_dir, cfg)
    method = build_method(cfg.train.method, cfg.method)
    if cfg.train.init_from:
        _check_init_from(cfg)
    split = data.split if data is not None else load_training_data(cfg.data, cfg.seed)
    spec = data.spec if data is not None else dataset_info(cfg.data.dataset, cfg.data.root).spec
    dataset = data.name if data is not None else dataset_info(cfg.data.dataset, cfg.data.root).name.value
    if cfg.train.batch_size > len(split.train_y):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the training set "
                          f"({len(split.train_y)} examples); use at most {len(split.train_y)}")
    members = list(members) if members is not None else _initial_members(cfg)
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
            start = _Start(split, method, members, spec, dataset)
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
    spec: InputSpec
    dataset: str


def _check_init_from(cfg: RunConfig) -> None:
    """Refuse a `train.init_from` run that cannot start this one: not a run, or another architecture,
    member count or dataset (hence classes and input shape)."""
    source = cfg.train.init_from
    try:
        other = read_run_config(source)
    except (RunDirError, ConfigError, CheckpointError) as exc:
        raise ConfigError(f"train.init_from = {source!r} is not allowed: {exc}") from None
    diffs = [f"{key} = {mine!r} here, {theirs!r} there" for key, mine, theirs in (
        ("model.arch", cfg.model.label, other.model.label), ("model.members", cfg.model.count, other.model.count),
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


def _train_locked(cfg: RunConfig, run_dir: Path, progress: bool, device: torch.device,
                  ctx: DistContext | None, start: _Start, board: TensorboardLog | None = None) -> Path:
    data, method = start.data, start.method
    members = [m.to(device) for m in start.members]
    extra = method_parameters(method, members, cfg.seed, device)
    params = [p for m in members for p in m.parameters()] + extra
    optimizer = make_optimizer(members, cfg.optim, extra)
    rng = torch.Generator(device=device)
    rng.manual_seed(cfg.seed)

    a = cfg.data.augment
    augment = Augment(crop_padding=a.crop_padding, flip=a.flip, noise_std=a.noise_std, noise=a.noise)
    batches = DeviceBatches(data.train_x, data.train_y, cfg.train.batch_size, device=device,
                            augment=augment, seed=cfg.seed)
    start_epoch, resume = restore(run_dir, cfg, resume_checkpoint(run_dir, ctx), members, method, optimizer, rng,
                                  batches, device)
    if ctx is None or ctx.is_main:
        keep_metrics_through(metrics_path(run_dir), start_epoch)
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
            state = EpochProgress(0, sum_tensor([0.0] * len(members), device), 0.0, rng.get_state())
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
            # summed as tensors on the device; read back once per epoch (a host sync per step otherwise)
            sums = sums + torch.as_tensor(member_losses, dtype=torch.float64, device=sums.device)
            for key, value in extras.items():
                extra_sums[key] = extra_sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64,
                                                                              device=sums.device)
            steps += 1
            if not bar.disable and steps % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{float(sums.sum()) / steps / len(members):.3f}")
            if board is not None:
                board.batch_loss(epoch * len(batches) + steps, lambda: float(sums.sum()) / steps / len(members),
                                 epoch_end=steps == len(batches))
            if every and (epoch * len(batches) + steps) % every == 0 and steps < len(batches):
                done = EpochProgress(steps, sums, state.seconds + time.perf_counter() - started,
                                      state.rng_epoch_start, extra_sums)
                _on_main(ctx, lambda: _save(run_dir, cfg, epoch, members, optimizer, rng, start.spec, start.dataset,
                                            method=method, progress=done, batches=batches.state_dict()))
        train_seconds = state.seconds + time.perf_counter() - started

        def finish_epoch() -> dict[str, Any]:
            val = validate(members, data.val_x, data.val_y, device)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "lr": lr_now, "train_loss": (sums / max(steps, 1)).tolist(),
                **{f"train_{k}": float(v) / max(steps, 1) for k, v in extra_sums.items()},
                **{f"val_{k}": v for k, v in val.items()}, "val_source": data.val_source,
                "epoch_seconds": train_seconds, **epoch_log,
            }
            every_diag = cfg.train.diagnostics_every
            if every_diag and (epoch + 1) % every_diag == 0:
                diagnostics = method.diagnostics(members, data.val_x, data.val_y, rng)
                if diagnostics is not None:
                    record["diagnostics"] = diagnostics
            append_jsonl(metrics_path(run_dir), record)
            if board is not None:
                board.epoch(record)
            _save(run_dir, cfg, epoch + 1, members, optimizer, rng, start.spec, start.dataset, method=method)
            return record

        record = _on_main(ctx, finish_epoch)
        if progress and record is not None:
            tqdm.write(_epoch_line(record))
    return run_dir


POSTFIX_EVERY = 10  # steps between progress-bar loss updates (each reads the running sum back to the host)


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
    member_losses: list[float] = [0.0] * len(members)
    bad, extras = 0.0, {}
    if len(local.y):
        with autocast(ctx.device, precision):
            out = method.loss(members, local, rng)
        if torch.isfinite(out.loss):
            out.loss.backward()
            member_losses, extras = [float(v) * weight for v in out.member_losses], out.extras
        else:
            bad = 1.0
    reduced = ctx.reduce_step(params, weight, [bad, *member_losses])
    if reduced[0]:
        _diverged(float("nan"), epoch, steps, run_dir)
    return reduced[1:], extras


def _epoch_line(record: dict[str, Any]) -> str:
    members = " ".join(f"{a:.3f}" for a in record["val_member_acc"])
    extra = f" layer={record['layer']}" if "layer" in record else ""
    return (f"epoch {record['epoch']:3d}  train loss {sum(record['train_loss']) / len(record['train_loss']):.4f}  "
            f"val acc mixture {record['val_mixture_acc']:.3f} members [{members}]  "
            f"{record['epoch_seconds']:.1f}s{extra}")
