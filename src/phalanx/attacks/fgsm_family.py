"""The FGSM variants of the GAL paper's evaluation (section 2.3): R-FGSM, I-FGSM and MI-FGSM.

Each is a few lines on the template in core.py: a starting point, a step size, a loop length and,
for MI-FGSM, a gradient transform (the momentum).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    _TINY,
    GradTransform,
    Loss,
    Norm,
    _per_example,
    attack,
    check_count,
    input_gradient,
    iterate,
    loss_objective,
    project,
    steepest_step,
)
from phalanx.errors import UsageError


def _rfgsm_arguments(args: dict[str, Any]) -> None:
    eps = args["eps"]
    if args["alpha"] is None:
        args["alpha"] = eps / 2
    alpha = args["alpha"]
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= eps):
        raise UsageError(f"alpha must be a number in [0, eps] = [0, {eps:g}], got {alpha!r}")


def _steps_argument(args: dict[str, Any]) -> None:
    check_count("steps", args["steps"])


def _mifgsm_arguments(args: dict[str, Any]) -> None:
    _steps_argument(args)
    mu = args["mu"]
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
        raise UsageError(f"mu must be a number >= 0, got {mu!r}")


@attack(check=_rfgsm_arguments)
def rfgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
          norm: Norm | str = "linf", targeted: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """R+FGSM (Tramèr et al. 2018, "Ensemble Adversarial Training", eq. 7): a random step of size
    alpha, then an FGSM step of size eps - alpha from there.

    Linf: x' = x + alpha * sign(N(0, I)), x_adv = x' + (eps - alpha) * sign(grad J(x')); L2: the
    random step is alpha times a random unit direction and the gradient step is normalized.
    `alpha` defaults to eps / 2, Tramèr et al.'s setting; the two steps together never leave the
    eps ball, so the final projection only clamps to [0, 1]. (The GAL paper words the random step
    as U(-eps, eps); this follows the original attack's definition.)

    Args: as `fgsm`, plus 0 <= alpha <= eps and an optional generator for the random step.
    Example: ``x_adv = rfgsm(model, x, y, eps=0.03)``.
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    x_rand = project(x + alpha * steepest_step(noise, norm), x, eps=eps, norm=norm)
    grad = input_gradient(model, x_rand, y, loss=Loss.CE, targeted=targeted)
    return project(x_rand + (eps - alpha) * steepest_step(grad, norm), x, eps=eps, norm=norm)


@attack(check=_steps_argument)
def ifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10,
          norm: Norm | str = "linf", targeted: bool = False) -> torch.Tensor:
    """I-FGSM / BIM (Kurakin et al. 2016; GAL paper eqs. 3-4): `steps` steps of size eps / steps
    from x itself (no random start), each projected into the eps ball and [0, 1].

    Example: ``x_adv = ifgsm(model, x, y, eps=0.03, steps=10)``.
    """
    return iterate(model, x, y, x, eps=eps, alpha=eps / steps, steps=steps, norm=norm,
                   objective=loss_objective(targeted=targeted))


def l1_momentum(mu: float) -> GradTransform:
    """The momentum of MI-FGSM (Dong et al. 2018, eq. 6; GAL paper eq. 5), as a gradient transform:
    g_{t+1} = mu * g_t + grad / ||grad||_1, the L1 norm taken per example.

    The L1 normalization is what makes it MI-FGSM: accumulating sign(grad) instead (as foolbox's
    Linf variant does) weights every step equally and is a different attack.
    """
    state: dict[str, torch.Tensor] = {}

    def transform(grad: torch.Tensor) -> torch.Tensor:
        l1 = grad.flatten(1).abs().sum(dim=1).clamp(min=_TINY)
        normed = grad / _per_example(l1, grad)
        state["g"] = normed if "g" not in state else mu * state["g"] + normed
        return state["g"]

    return transform


@attack(check=_mifgsm_arguments)
def mifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10, mu: float = 1.0,
           norm: Norm | str = "linf", targeted: bool = False) -> torch.Tensor:
    """MI-FGSM (Dong et al. 2018, Algorithm 1): I-FGSM whose step follows the momentum `l1_momentum(mu)`;
    `steps` steps of size eps / steps from x, x_{t+1} = project(x_t + eps/steps * sign(g_{t+1})) (Linf)
    or g_{t+1} / ||g_{t+1}||_2 (L2, their eq. 8). Defaults: the GAL paper's k = 10, mu = 1.0.

    Example: ``x_adv = mifgsm(model, x, y, eps=0.03)``.
    """
    return iterate(model, x, y, x, eps=eps, alpha=eps / steps, steps=steps, norm=norm,
                   objective=loss_objective(targeted=targeted), transform=l1_momentum(mu))
