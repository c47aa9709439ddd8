"""Fast gradient sign method (Goodfellow et al. 2015), its L2 form (the fast gradient method), and
the two one-step attacks of adversarial training: FGSM with a random start (Wong et al. 2020) and
FGSM with one radius per example (ensemble adversarial training)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss, Norm, attack, check_alpha, input_gradient, iterate, project, sample_in_ball, steepest_step,
)


@attack
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm | str = "linf",
         targeted: bool = False) -> torch.Tensor:
    """One step of size eps along the steepest-ascent direction of the cross-entropy.

    Linf: x + eps * sign(grad) (Goodfellow et al. 2015, eq. 3); L2: x + eps * grad / ||grad||_2
    per example (the fast gradient method). Then projected into [0, 1]. When `targeted`, `y` is
    the target class and the step descends its loss.

    Args: model returns logits for pixels in [0, 1]; x (B, ...) in [0, 1]; y (B,) class indices;
    eps >= 0; norm "linf" or "l2". Returns x_adv shaped like x; x is not modified.
    Example: ``x_adv = fgsm(model, x, y, eps=8/255)``.
    """
    grad = input_gradient(model, x, y, loss=Loss.CE, targeted=targeted)
    return project(x + eps * steepest_step(grad, norm), x, eps=eps, norm=norm)


def _fgsm_rs_arguments(args: dict[str, Any]) -> None:
    check_alpha(args["alpha"])


@attack(norm=Norm.LINF, check=_fgsm_rs_arguments)
def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM from a random start (Wong, Rice & Kolter 2020, "Fast is better than free", Algorithm 3's
    example): delta ~ U(-eps, eps), then one signed CE step of `alpha` from x + delta, projected into
    the Linf eps ball and [0, 1]: `core.iterate` for one step from `core.sample_in_ball`.

    Args: as `fgsm`, plus alpha > 0 (Wong et al. use 1.25 * eps) and a generator for the start.
    Example: ``x_adv = fgsm_rs(model, x, y, eps=8/255, alpha=10/255)``.
    """
    start = sample_in_ball(x, eps=eps, norm=Norm.LINF, generator=generator)
    return iterate(model, x, y, start, eps=eps, alpha=alpha, steps=1, norm=Norm.LINF)


@attack(norm=Norm.LINF)
def fgsm_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     eps: torch.Tensor) -> torch.Tensor:
    """Linf FGSM with its own radius per example: x_b + eps_b * sign(grad_x CE(model(x_b), y_b)),
    clamped to [0, 1] (Tramèr et al. 2018's ensemble adversarial training, with the per-example
    radii of Kurakin et al. 2016 section 4.1).

    Args: as `fgsm`, with eps a tensor (B,) of radii >= 0.
    Example: ``x_adv = fgsm_per_example(static_model, x, y, eps=torch.full((len(y),), 0.1))``.
    """
    grad = input_gradient(model, x, y, loss=Loss.CE, targeted=False)
    step = eps.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1))) * grad.sign()
    return (x + step).clamp(0.0, 1.0)
