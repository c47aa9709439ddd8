"""What an evaluation measures on a batch: which examples a model gets right, and how far a perturbation went."""

from __future__ import annotations

import torch
from torch import nn

from phalanx.attacks.core import norms


def max_perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> float:
    """The largest per-example norm of x_adv - x in the attack's norm ("linf" or "l2")."""
    return float(norms(x_adv - x, norm).amax()) if len(x) else 0.0


@torch.no_grad()
def correct_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per example: does `model` classify it correctly? The model's mode is left as found."""
    mode = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size] for i in range(0, len(y), batch_size)]
                    ) if len(y) else torch.zeros(0, dtype=torch.bool, device=y.device)
    model.train(mode)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on float pixels `x`; the model's mode is left as found."""
    return float(correct_mask(model, x, y, batch_size).float().mean()) if len(y) else 0.0
