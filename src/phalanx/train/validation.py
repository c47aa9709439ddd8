"""Validation at each epoch's end: loss and accuracy of every member and of the mixture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from phalanx.models import Classifier, mixture_log_probs


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
