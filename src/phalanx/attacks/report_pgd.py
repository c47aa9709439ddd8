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

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss, Norm, attack_mode, check_alpha, check_count, check_eps, check_inputs, coerce_norm, input_gradient,
    steepest_step,
)

REPORT_STEPS = 5  # the report's evaluation script runs 5 iterations (its text says 10)
REPORT_ALPHA = 0.007  # the report's Linf step (section 3.1)


def report_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float = REPORT_ALPHA,
               steps: int = REPORT_STEPS, norm: Norm | str = "linf") -> torch.Tensor:
    """The report's iterative attack: `steps` unprojected steps from x (see the module docstring).

    Linf: x <- clamp(x + clamp(alpha * sign(g), -eps, eps), 0, 1); L2: x <- clamp(x + eps * g / ||g||_2, 0, 1)
    (`alpha` is unused under L2: the script's L2 step is eps). The perturbation is bounded by
    `reach(eps, alpha, steps, norm)`, not by eps.
    Example: ``x_adv = report_pgd(model, x, y, eps=0.03, norm="l2")``.
    """
    norm = coerce_norm(norm)
    check_eps(eps)
    check_alpha(alpha)
    check_count("steps", steps)
    check_inputs(x, y)
    x_adv = x.detach()
    with attack_mode(model):
        for _ in range(steps):
            grad = input_gradient(model, x_adv, y, loss=Loss.CE, targeted=False)
            if norm is Norm.LINF:
                change = (alpha * grad.sign()).clamp(-eps, eps)
            else:
                change = eps * steepest_step(grad, Norm.L2)
            x_adv = (x_adv + change).clamp(0.0, 1.0).detach()
    return x_adv


def reach(eps: float, alpha: float, steps: int, norm: Norm | str) -> float:
    """The largest perturbation `report_pgd` can make: its threat model, for the budget check."""
    return steps * (min(alpha, eps) if coerce_norm(norm) is Norm.LINF else eps)
