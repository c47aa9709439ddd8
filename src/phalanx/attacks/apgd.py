"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...", Algorithm 1)
with the cross-entropy or the difference-of-logits-ratio (DLR) loss.

PGD with momentum and a step size that needs no tuning: it starts at 2 * eps and is halved at
checkpoints where progress stalled, restarting from the best point found so far.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss,
    Norm,
    _per_example,
    attack_mode,
    attack_objective,
    check_count,
    check_eps,
    check_inputs,
    coerce_norm,
    is_worse_case,
    project,
    sample_in_ball,
    steepest_step,
    succeeded,
)
from phalanx.enums import coerce_enum


class ApgdLoss(str, Enum):
    CE = "ce"
    DLR = "dlr"


def coerce_apgd_loss(loss: ApgdLoss | str) -> ApgdLoss:
    return coerce_enum(ApgdLoss, loss, "APGD loss")


def dlr_objective(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool) -> torch.Tensor:
    """The DLR loss the attacker ascends (Croce & Hein 2020, eq. 5), per example:
    (max_{j != y} z_j - z_y) / (z_pi1 - z_pi3 + 1e-12), z_pi sorted in decreasing order.

    Invariant to shifting and rescaling the logits. Targeted (y = target t): its negation on t,
    (z_t - max_{j != t} z_j) / (z_pi1 - z_pi3); the paper's targeted DLR (eq. 6) also needs the
    true class, which this attack interface does not carry.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    margin = attack_objective(logits, y, loss=Loss.CW, targeted=targeted)
    return margin / (top[:, 0] - top[:, 2] + 1e-12)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations where APGD may halve its step (Croce & Hein 2020, section 3.2: p_1 = 0.22,
    period shrinking by 0.03 down to 0.06), in whole iterations as the authors' autopgd_base.py:
    first period int(0.22 n), each next one int(0.03 n) shorter, never below int(0.06 n), all >= 1.
    For n = 100: 22, 41, 57, 70, 80, 87, 93, 99; for n = 10: every iteration from the 2nd."""
    period, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
    out, at = [], period
    while at <= steps:
        out.append(at)
        period = max(period - shrink, shortest)
        at += period
    return out


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
         loss: ApgdLoss | str = "ce", norm: Norm | str = "linf", momentum: float = 0.75, rho: float = 0.75,
         random_start: bool = True, targeted: bool = False,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD (Croce & Hein 2020, Algorithm 1): `steps` gradient steps, one gradient each.

    z = P(x_k + eta * step(grad)); x_{k+1} = P(x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_{k-1}))
    (no momentum on the first step); eta starts at 2 * eps. At each checkpoint (`apgd_checkpoints`)
    an example's eta is halved and it restarts from its highest-loss point when (1) the loss rose in
    fewer than rho of the steps since the last checkpoint, or (2) eta was not halved at the last
    checkpoint and the best loss has not improved since. Returned per example: an iterate that
    fooled the model if any did (targeted: reached the target), else the highest-loss one.

    Args: loss "ce" or "dlr" (the latter needs >= 3 classes); norm "linf" or "l2"; momentum = alpha
    and rho as in the paper (0.75 both); random_start: start uniformly in the ball (from `generator`).
    Example: ``x_adv = apgd(model, x, y, eps=8/255, steps=100, loss="dlr")``.
    """
    norm, loss = coerce_norm(norm), coerce_apgd_loss(loss)
    check_eps(eps)
    check_count("steps", steps)
    check_inputs(x, y)
    x = x.detach()
    if x.shape[0] == 0:
        return x.clone()

    def evaluate(x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x_req = x_k.detach().requires_grad_(True)
            logits = model(x_req)
            if loss is ApgdLoss.CE:
                value = attack_objective(logits, y, loss=Loss.CE, targeted=targeted)
            else:
                value = dlr_objective(logits, y, targeted=targeted)
            (grad,) = torch.autograd.grad(value.sum(), x_req)
        return value.detach(), grad, succeeded(logits.detach(), y, targeted=targeted)

    def pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_example(mask, a), a, b)

    checkpoints = set(apgd_checkpoints(steps))
    with attack_mode(model):
        x_k = sample_in_ball(x, eps=eps, norm=norm, generator=generator) if random_start else x
        value, grad, success = evaluate(x_k)
        x_max, f_max, grad_max = x_k, value, grad  # highest-loss point, where restarts go
        best, best_success, best_value = x_k, success, value  # what is returned
        eta = torch.full_like(value, 2 * eps)
        x_prev, rises, last_check = x_k, torch.zeros_like(value), 0
        # "halved" at the start, so condition (2) cannot fire at the first checkpoint (autopgd_base.py)
        f_max_at_check, halved_at_check = f_max.clone(), torch.ones_like(success)
        for k in range(steps):
            z = project(x_k + _per_example(eta, x_k) * steepest_step(grad, norm), x, eps=eps, norm=norm)
            a = 1.0 if k == 0 else momentum
            x_new = project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, eps=eps, norm=norm)
            value_new, grad_new, success_new = evaluate(x_new)
            rises += (value_new > value).to(rises.dtype)
            improved = value_new > f_max
            x_max, grad_max = pick(improved, x_new, x_max), pick(improved, grad_new, grad_max)
            f_max = torch.where(improved, value_new, f_max)
            better = is_worse_case(success_new, value_new, best_success, best_value)
            best, best_value = pick(better, x_new, best), torch.where(better, value_new, best_value)
            best_success = best_success | success_new
            x_prev, x_k, value, grad = x_k, x_new, value_new, grad_new
            if k + 1 in checkpoints:
                stalled = rises <= rho * (k + 1 - last_check)  # <=, as autopgd_base.py's check_oscillation
                flat = ~halved_at_check & (f_max <= f_max_at_check)
                halve = stalled | flat
                eta = torch.where(halve, eta / 2, eta)
                # restart from the best point; as autopgd_base.py, the momentum term of the next step is
                # (x_max - previous iterate) and the next rise is counted against the last iterate's loss
                x_k, grad = pick(halve, x_max, x_k), pick(halve, grad_max, grad)
                rises, last_check = torch.zeros_like(rises), k + 1
                f_max_at_check, halved_at_check = f_max.clone(), halve
    return best.detach()
