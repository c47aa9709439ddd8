"""PGD-CW: projected gradient ascent on the Carlini-Wagner hinge loss with a confidence kappa."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss, Norm, Objective, attack, attack_objective, check_alpha, check_count, iterate, sample_in_ball,
)
from phalanx.attacks.pgd import madry_step
from phalanx.errors import UsageError


def cw_objective(logits: torch.Tensor, y: torch.Tensor, *, kappa: float, targeted: bool) -> torch.Tensor:
    """The per-example hinge the attacker ascends: min(margin, kappa) (Carlini & Wagner 2017, f_6).

    margin = max_{j != y} z_j - z_y untargeted, z_t - max_{j != t} z_j targeted (y = t). Once an
    example is misclassified with confidence kappa its objective is flat and it stops moving.
    """
    return attack_objective(logits, y, loss=Loss.CW, targeted=targeted).clamp(max=kappa)


def cw_hinge(*, kappa: float, targeted: bool) -> Objective:
    """`cw_objective` of the model's output, as the `Objective` of `core.iterate`."""
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cw_objective(model(x), y, kappa=kappa, targeted=targeted)
    return objective


def _pgd_cw_arguments(args: dict[str, Any]) -> None:
    check_count("steps", args["steps"])
    if args["alpha"] is None:
        args["alpha"] = madry_step(args["eps"], args["steps"])
    if args["eps"] > 0:
        check_alpha(args["alpha"])
    kappa = args["kappa"]
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa >= 0:
        raise UsageError(f"kappa must be a number >= 0, got {kappa!r}")


@attack(check=_pgd_cw_arguments)
def pgd_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 30,
           alpha: float | None = None, kappa: float = 50.0, norm: Norm | str = "linf",
           random_start: bool = True, targeted: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD (Madry et al. 2018) on `cw_objective`: x <- project(x + alpha * step(grad min(margin, kappa))),
    `core.iterate`'s loop on the objective `cw_hinge(kappa)`.

    Defaults are the GAL paper's (section 4.1): kappa = 50, 30 iterations. The paper gives no step
    size; alpha defaults to `madry_step(eps, steps)` = 2.5 * eps / steps (Madry et al.'s rule),
    with a random start.

    Example: ``x_adv = pgd_cw(model, x, y, eps=0.03)``.
    """
    start = sample_in_ball(x, eps=eps, norm=norm, generator=generator) if random_start else x
    return iterate(model, x, y, start, eps=eps, alpha=alpha, steps=steps, norm=norm,
                   objective=cw_hinge(kappa=kappa, targeted=targeted))
