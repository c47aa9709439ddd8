"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...", Algorithm 1)
with the cross-entropy or the difference-of-logits-ratio (DLR) loss.

PGD with momentum and a step size that needs no tuning: it starts at 2 * eps and is halved at
checkpoints where progress stalled, restarting from the best point found so far.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Ensemble,
    Loss,
    Norm,
    _per_example,
    attack,
    attack_objective,
    check_count,
    is_worse_case,
    objective_and_logits,
    project,
    sample_in_ball,
    steepest_step,
    succeeded,
    targeted_dlr,
)
from phalanx.errors import UsageError
from phalanx.models.mixture import mixture_log_probs


def dlr_objective(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool) -> torch.Tensor:
    """The DLR loss the attacker ascends (Croce & Hein 2020, eq. 5), per example:
    (max_{j != y} z_j - z_y) / (z_pi1 - z_pi3 + 1e-12), z_pi sorted in decreasing order; targeted
    (y = target t) its negation on t. APGD-T uses the paper's targeted DLR (eq. 6, `targeted_dlr`),
    which also needs the true class.
    """
    return attack_objective(logits, y, loss=Loss.DLR, targeted=targeted)


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


# (x_k) -> (objective to ascend, its input gradient, success) for every example of the batch
Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _apgd_run(x: torch.Tensor, x_start: torch.Tensor, evaluate: Evaluate, *, eps: float, steps: int, norm: Norm,
              momentum: float, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD's loop (Croce & Hein 2020, Algorithm 1) from `x_start`; returns, per example, an iterate
    that succeeded if any did, else the highest-objective one, and whether it succeeded."""
    def pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_example(mask, a), a, b)

    checkpoints = set(apgd_checkpoints(steps))
    x_k = x_start
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
    return best.detach(), best_success


def _apgd_arguments(args: dict[str, Any]) -> None:
    check_count("steps", args["steps"])
    check_count("restarts", args["restarts"])


def _apgd_t_arguments(args: dict[str, Any]) -> None:
    _apgd_arguments(args)
    check_count("target_classes", args["target_classes"])


@attack(check=_apgd_arguments)
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
         loss: Loss | str = "ce", norm: Norm | str = "linf", momentum: float = 0.75, rho: float = 0.75,
         random_start: bool = True, restarts: int = 1, targeted: bool = False, ensemble: Ensemble | str = "output",
         generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD (Croce & Hein 2020, Algorithm 1): `steps` gradient steps, one gradient each.

    z = P(x_k + eta * step(grad)); x_{k+1} = P(x_k + momentum * (z - x_k) + (1 - momentum) * (x_k - x_{k-1}))
    (no momentum on the first step); eta starts at 2 * eps. At each checkpoint (`apgd_checkpoints`)
    an example's eta is halved and it restarts from its highest-loss point when (1) the loss rose in
    fewer than rho of the steps since the last checkpoint, or (2) eta was not halved at the last
    checkpoint and the best loss has not improved since. Returned per example: an iterate that
    fooled the model if any did (targeted: reached the target), else the highest-loss one; with
    `restarts` > 1, later runs start again (randomly) for the examples not yet fooled.

    Args: loss "ce", "dlr" (>= 3 classes) or "cw"; norm "linf" or "l2"; momentum = alpha and rho as
    in the paper (0.75 both); random_start: start uniformly in the ball (from `generator`);
    ensemble: the function of an ensemble the loss is taken on (losses.Ensemble; "output" for any model).
    Example: ``x_adv = apgd(model, x, y, eps=8/255, steps=100, loss="dlr")``.
    """
    if x.shape[0] == 0:
        return x.clone()

    def runner(xs: torch.Tensor, ys: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def evaluate(x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                x_req = x_k.detach().requires_grad_(True)
                value, logits = objective_and_logits(model, x_req, ys, loss=loss, targeted=targeted,
                                                     ensemble=ensemble)
                (grad,) = torch.autograd.grad(value.sum(), x_req)
            return value.detach(), grad, succeeded(logits.detach(), ys, targeted=targeted)
        return _apgd_run(xs, start, evaluate, eps=eps, steps=steps, norm=norm, momentum=momentum, rho=rho)

    return _with_restarts(x, y, runner, eps=eps, norm=norm, restarts=restarts if random_start else 1,
                          random_start=random_start, generator=generator)


Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _with_restarts(x: torch.Tensor, y: torch.Tensor, runner: Runner, *, eps: float, norm: Norm, restarts: int,
                   random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Run `runner` (x, y, start) -> (x_adv, success) up to `restarts` times, each time on the examples
    not yet fooled (autopgd_base.py's perturb); the first run's point is kept where none succeeds."""
    out = x.clone()
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for r in range(restarts):
        idx = (~done).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]
        start = sample_in_ball(xs, eps=eps, norm=norm, generator=generator) if random_start else xs
        x_adv, success = runner(xs, ys, start)
        keep = success if r > 0 else torch.ones_like(success)
        out[idx[keep]] = x_adv[keep]
        done[idx[success]] = True
    return out


@attack(check=_apgd_t_arguments)
def apgd_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
           target_classes: int = 9, norm: Norm | str = "linf", momentum: float = 0.75, rho: float = 0.75,
           random_start: bool = True, restarts: int = 1, ensemble: Ensemble | str = "output",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020, section 4): APGD on the targeted DLR loss (eq. 6, `targeted_dlr`)
    towards each of the `target_classes` classes the model ranks highest after the true one (at the
    clean point), one `steps`-iteration run per target on the examples not yet fooled; success is any
    misclassification. `y` holds the true classes. AutoAttack's standard suite: 9 targets, 100
    iterations, 1 restart (autoattack.py). Needs at least 4 classes; fewer targets are run when the
    model has fewer than `target_classes` + 1 classes.

    Example: ``x_adv = apgd_t(model, x, y, eps=8/255)``.
    """
    if x.shape[0] == 0:
        return x.clone()
    out = x.clone()
    with torch.no_grad():
        clean = model(x)
    if clean.shape[1] < 4:
        raise UsageError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {clean.shape[1]}")
    ranked = clean.argsort(dim=1, descending=True)
    done = clean.argmax(dim=1) != y
    for rank in range(1, min(target_classes, clean.shape[1] - 1) + 1):
        # as autopgd_base.py: the target is the (rank + 1)-th class of the clean logits; the examples left
        # are classified correctly, so their true class is first and never a target
        idx = (~done).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        target = ranked[idx, rank]

        def runner(xs: torch.Tensor, ys: torch.Tensor, start: torch.Tensor,
                   target: torch.Tensor = target) -> tuple[torch.Tensor, torch.Tensor]:
            def evaluate(x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                with torch.enable_grad():
                    x_req = x_k.detach().requires_grad_(True)
                    value, logits = _targeted_dlr_objective(model, x_req, ys, target, ensemble)
                    (grad,) = torch.autograd.grad(value.sum(), x_req)
                return value.detach(), grad, succeeded(logits.detach(), ys, targeted=False)
            return _apgd_run(xs, start, evaluate, eps=eps, steps=steps, norm=norm, momentum=momentum, rho=rho)

        x_adv = _with_restarts(x[idx], y[idx], runner, eps=eps, norm=norm,
                               restarts=restarts if random_start else 1, random_start=random_start,
                               generator=generator)
        with torch.no_grad():
            fooled = model(x_adv).argmax(dim=1) != y[idx]
        out[idx[fooled]] = x_adv[fooled]
        done[idx[fooled]] = True
    return out


def _targeted_dlr_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                            ensemble: Ensemble) -> tuple[torch.Tensor, torch.Tensor]:
    """The targeted DLR of the model's output, or of the mean of an ensemble's logits."""
    if ensemble is Ensemble.OUTPUT:
        logits = model(x)
        return targeted_dlr(logits, y, target), logits
    if ensemble is not Ensemble.MEAN_LOGITS:
        raise UsageError(f"APGD-T takes ensemble 'output' or 'mean-logits', got {ensemble.value!r}")
    member_logits = model.member_logits(x)
    return targeted_dlr(member_logits.mean(dim=0), y, target), mixture_log_probs(member_logits)
