"""TRS's perturbation (Yang et al., NeurIPS 2021; the authors' train/Empirical/trainer.py PGD):
points of the Linf ball around x where the members' input gradients are largest.

Not an attack on the label: it ascends sum_i ||grad_x CE(f_i(x), y)||^2, the quantity TRS's
smoothness term penalizes, so that the term is taken at a worst case within the ball.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks.core import Norm, attack, check_alpha, check_count, iterate, sample_in_ball

# The step is eps / 3 (the authors' trainer.py PGD: `alpha = eps / 3.`).
STEP_FRACTION = 1 / 3


def summed_squared_gradient_norms(members: nn.ModuleList, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i ||grad_x CE(f_i(x_b), y_b)||^2 per example, shape (B,): an `Objective` of `core.iterate`
    on the members (an nn.ModuleList), differentiable in x (the gradients keep their graph)."""
    total = x.new_zeros(x.shape[0])
    for m in members:
        ce = F.cross_entropy(m(x), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        total = total + g.pow(2).flatten(1).sum(1)
    return total


def _max_gradient_norm_arguments(args: dict[str, Any]) -> None:
    check_count("steps", args["steps"])
    if args["alpha"] is None:
        args["alpha"] = args["eps"] * STEP_FRACTION
    if args["eps"] > 0 or args["alpha"] != 0:
        check_alpha(args["alpha"])


@attack(norm=Norm.LINF, check=_max_gradient_norm_arguments)
def max_gradient_norm(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, eps: float,
                      steps: int = 6, alpha: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Points of the Linf eps ball around x (and in [0, 1]) where sum_i ||grad_x CE_i||^2 is high:
    `steps` signed steps of alpha (default eps / 3) from a uniform random start, each projected
    (`core.iterate` on `summed_squared_gradient_norms`).

    Args: members, the models whose gradients are measured (each left as found); x (B, ...) in
    [0, 1]; y (B,) class indices; eps >= 0; steps >= 1 (the authors' 6); a generator for the start.
    Example: ``x_s = max_gradient_norm(members, x, y, eps=0.03, generator=rng)``.
    """
    start = sample_in_ball(x, eps=eps, norm=Norm.LINF, generator=generator)
    return iterate(nn.ModuleList(members), x, y, start, eps=eps, alpha=alpha, steps=steps, norm=Norm.LINF,
                   objective=summed_squared_gradient_norms)
