"""Projected gradient descent (Madry et al. 2018) under the Linf or L2 norm, with restarts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Ensemble, Loss, Norm, attack, check_alpha, check_count, is_worse_case, iterate, loss_objective,
    objective_and_logits, sample_in_ball, succeeded,
)


def madry_step(eps: float, steps: int) -> float:
    """The default PGD step: 2.5 * eps / steps (Madry et al. 2018, appendix: the attack can walk
    to the ball's edge and back within its steps, whatever eps is)."""
    return 2.5 * eps / steps


def _pgd_arguments(args: dict[str, Any]) -> None:
    check_count("steps", args["steps"])
    if args["alpha"] is None:
        args["alpha"] = madry_step(args["eps"], args["steps"])
    if args["eps"] > 0 or args["alpha"] != 0:
        check_alpha(args["alpha"])
    check_count("restarts", args["restarts"])


@attack(check=_pgd_arguments)
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
        steps: int = 10, norm: Norm | str = "linf", random_start: bool = True, restarts: int = 1,
        targeted: bool = False, generator: torch.Generator | None = None, loss: Loss | str = "ce",
        ensemble: Ensemble | str = "output") -> torch.Tensor:
    """`steps` steps x <- project(x + alpha * d), d = sign(grad) (Linf) or grad / ||grad||_2 (L2).

    Madry et al. (2018), eq. 2, with the projection onto the eps ball around x and [0, 1].
    `alpha` defaults to `madry_step(eps, steps)` = 2.5 * eps / steps. The last iterate is
    returned. With `random_start`, each run starts at a uniformly random point of the ball (see
    `core.sample_in_ball`), drawn from `generator` when given. With `restarts` > 1, each example
    keeps the run where the attack succeeded (misclassified, or classified as the target when
    `targeted`), else the run with the highest objective; without a random start all runs would be
    identical, so only one is made. `loss` is "ce" (cross-entropy), "cw" (the Carlini-Wagner
    margin, for PGD-CW) or "dlr"; `ensemble` picks the function of an ensemble that the loss is
    taken on (losses.Ensemble; "output" for any model).

    Args: model returns logits for pixels in [0, 1]; x (B, ...) in [0, 1]; y (B,) class indices
    (target classes when `targeted`); eps >= 0, alpha > 0, steps >= 1, restarts >= 1.
    Returns x_adv shaped like x; x is not modified.
    Example: ``x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=10)``.
    """
    objective = loss_objective(loss, targeted=targeted, ensemble=ensemble)
    runs = restarts if random_start else 1
    best, best_success, best_value = x, None, None
    for _ in range(runs):
        start = sample_in_ball(x, eps=eps, norm=norm, generator=generator) if random_start else x
        x_adv = iterate(model, x, y, start, eps=eps, alpha=alpha, steps=steps, norm=norm,
                        objective=objective)
        if runs == 1:
            return x_adv
        with torch.no_grad():
            value, logits = objective_and_logits(model, x_adv, y, loss=loss, targeted=targeted,
                                                 ensemble=ensemble)
        success = succeeded(logits, y, targeted=targeted)
        if best_success is None or best_value is None:
            best, best_success, best_value = x_adv, success, value
            continue
        better = is_worse_case(success, value, best_success, best_value)
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
        best_success, best_value = best_success | success, torch.where(better, value, best_value)
    return best
