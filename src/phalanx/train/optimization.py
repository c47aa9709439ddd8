"""The optimizer and its schedule: one parameter group per member, plus a method's own parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from phalanx.config import OptimConfig
from phalanx.models import Classifier


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


def method_parameters(method: Any, members: Sequence[Classifier], seed: int,
                       device: torch.device) -> list[torch.nn.Parameter]:
    """A method's own trainable parameters (`extra_parameters(members)`, e.g. RRM's projections),
    built once the members are on `device`; [] for methods without any.

    They are initialized from a seed of their own, so a run (and every torchrun rank) gets the
    same ones whatever drew from torch's global generator before.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1000 + 999)
        return list(method.extra_parameters(members))
