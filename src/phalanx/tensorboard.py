"""Optional TensorBoard logging of the metrics that training writes to metrics.jsonl.

metrics.jsonl stays the record of a run; TensorBoard is a live view of the same numbers
(`phalanx train ... --tensorboard`), never required. Needs the `tensorboard` package
(`pip install 'phalanx[tensorboard]'`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STEP_LOSS_EVERY = 20  # batches between two running-loss points: enough for a curve, few events


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl epoch record, under TensorBoard tags.

    Lists become one tag per member (`train_loss/member1`, ...); a transferability matrix
    becomes its off-diagonal mean; non-numeric values (the drawn layer) are left out.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("epoch", "val_source"):
            continue
        if key == "diagnostics" and isinstance(value, Mapping):
            out.update(_diagnostic_scalars(value))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            out[_tag(key)] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{_tag(key)}/member{i + 1}": float(v) for i, v in enumerate(value)})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _tag(key: str) -> str:
    """`val_member_acc` -> `val/member_acc`: TensorBoard groups tags by their first segment."""
    for prefix in ("val_", "train_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


def _diagnostic_scalars(diag: Mapping[str, Any]) -> dict[str, float]:
    """Each member-by-member matrix (transferability, vulnerability diversity) as its off-diagonal mean."""
    out: dict[str, float] = {}
    for name, value in diag.items():
        if isinstance(value, list) and len(value) > 1 and all(isinstance(r, list) for r in value):
            off = [row[j] for i, row in enumerate(value) for j in range(len(row)) if i != j]
            if off and all(isinstance(v, (int, float)) for v in off):
                out[f"diagnostics/{name}_offdiag_mean"] = sum(off) / len(off)
    return out


class TensorboardUnavailable(ImportError):
    """`--tensorboard` was asked for but the tensorboard package is not installed."""


def require_tensorboard() -> None:
    """Fail early, before any training, when `--tensorboard` cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
    except ImportError as err:
        raise TensorboardUnavailable("--tensorboard needs the tensorboard package, which is not installed: "
                                     "pip install 'phalanx[tensorboard]' (or pip install tensorboard)") from err


class TensorboardLog:
    """Writes epoch records and running batch losses as TensorBoard scalars in `log_dir`."""

    def __init__(self, log_dir: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def batch_loss(self, global_step: int, loss: float | Callable[[], float], *, epoch_end: bool = False) -> None:
        """The running mean training loss of the epoch, every `STEP_LOSS_EVERY` batches and at its end.
        `loss` may be a function, called only then (reading a device tensor back is a host sync)."""
        if not (global_step % STEP_LOSS_EVERY == 0 or epoch_end):
            return
        value = loss() if callable(loss) else loss
        if math.isfinite(value):
            self._writer.add_scalar("train/running_loss", value, global_step)

    def epoch(self, record: Mapping[str, Any]) -> None:
        """Every scalar of an epoch record, at step = the epoch number."""
        step = int(record["epoch"])
        for tag, value in record_scalars(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
