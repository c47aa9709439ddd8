"""The DVERGE report's own PGD attacks, exactly as its evaluation script defines them.

They are not PGD in Madry et al.'s sense and are never a default: they exist so that our models
can be measured the way the report measured its own (the `dverge-report` protocol).

- Linf: each step adds alpha * sign(grad), the *step* clamped to [-eps, eps], relative to the
  previous iterate; nothing projects onto the eps ball around the clean image, so after k steps the
  perturbation can reach k * alpha (0.035 after 5 steps of 0.007, above eps = 0.03).
- L2: each step adds the L2-normalised gradient rescaled to norm eps, never projected, so after k
  steps the perturbation's L2 norm reaches up to k * eps.
- No random start; the script runs 5 iterations (the report's text says 10).

Both keep pixels in [0, 1] (assumed: the report's images are ToTensor() pixels and the script's
attack output is fed back to the model as an image).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss, Norm, attack, check_alpha, check_count, coerce_norm, input_gradient, steepest_step,
)

# The report's evaluation settings (section 3.1), written once: `registry.report_attacks` builds
# both its stated attacks and its script's from them.
REPORT_EPS = 0.03
REPORT_ALPHA = 0.007  # its Linf step
REPORT_STATED_STEPS = 10  # the iterations its text states
REPORT_STEPS = 5  # the iterations its evaluation script runs


def reach(eps: float, alpha: float, steps: int, norm: Norm | str) -> float:
    """The largest perturbation `report_pgd` can make: its threat model, for the budget check."""
    return steps * (min(alpha, eps) if coerce_norm(norm) is Norm.LINF else eps)


def report_reach(eps: float, params: Mapping[str, Any]) -> float:
    """`reach` of a call's arguments: the budget `report_pgd` is held to (`core.attack`, the registry)."""
    return reach(eps, params["alpha"], params["steps"], params["norm"])


def _report_pgd_arguments(args: dict[str, Any]) -> None:
    check_alpha(args["alpha"])
    check_count("steps", args["steps"])


@attack(budget=report_reach, check=_report_pgd_arguments)
def report_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float = REPORT_ALPHA,
               steps: int = REPORT_STEPS, norm: Norm | str = "linf") -> torch.Tensor:
    """The report's iterative attack: `steps` unprojected steps from x (see the module docstring).

    Linf: x <- clamp(x + clamp(alpha * sign(g), -eps, eps), 0, 1); L2: x <- clamp(x + eps * g / ||g||_2, 0, 1)
    (`alpha` is unused under L2: the script's L2 step is eps). The perturbation is bounded by
    `reach(eps, alpha, steps, norm)`, not by eps.
    Example: ``x_adv = report_pgd(model, x, y, eps=0.03, norm="l2")``.
    """
    x_adv = x
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, loss=Loss.CE, targeted=False)
        if norm is Norm.LINF:
            change = (alpha * grad.sign()).clamp(-eps, eps)
        else:
            change = eps * steepest_step(grad, Norm.L2)
        x_adv = (x_adv + change).clamp(0.0, 1.0).detach()
    return x_adv
