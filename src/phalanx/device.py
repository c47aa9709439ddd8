"""Where a command runs: the device named by `device` in a config or `--device`, and the
autocast context of `train.precision`. Shared by training and evaluation, so that evaluation
does not import the training loop."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from phalanx.config import DEVICE_RULE, ConfigError, valid_device


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
