"""Gradient Diversity Rating of a trained ensemble (Adam & Speciel 2020, arXiv:2005.05750, and the
authors' blog): per example, the first-order fraction of input directions that fool every member
in the same way. The rating and its derivation are `phalanx.geometry`'s (`gdr_from_gradients`),
shared with the `gdr` training method; this module measures it on members in eval mode.

`mode="class"` takes, per example, the largest rating over the wrong classes c (the blog's "same
wrong class"), from the gradients of the margins z_c - z_y; `mode="loss"` uses the members'
cross-entropy gradients instead (all losses rise together), the quantity the `gdr` training
method regularizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from phalanx.attacks import attack_mode
from phalanx.errors import UsageError
from phalanx.geometry import ce_input_gradient, gdr_from_gradients, margin_input_gradients


def gradient_diversity_rating(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                              mode: Literal["class", "loss"] = "class", samples: int = 20000,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """GDR of an ensemble per example, shape (batch,): lower means fewer shared adversarial directions.

    Members are evaluated in eval mode (restored afterwards); parameters get no gradients.
    Example: ``gradient_diversity_rating(members, x, y).mean()``.
    """
    if mode not in ("class", "loss"):
        raise UsageError(f"mode must be 'class' or 'loss', got {mode!r}")
    with attack_mode(*members):
        if mode == "loss":
            grads = [ce_input_gradient(m, x, y)[1] for m in members]
            return gdr_from_gradients(grads, samples=samples, generator=generator).detach()
        per_member = [margin_input_gradients(m, x, y) for m in members]  # each (classes, batch, ...)
    classes = per_member[0].shape[0]
    ratings = torch.stack([gdr_from_gradients([g[c] for g in per_member], samples=samples, generator=generator)
                           for c in range(classes)])  # (classes, batch)
    ratings[y, torch.arange(len(y), device=y.device)] = 0.0  # the true class is not a wrong class
    return ratings.amax(dim=0).detach()
