"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack"), as AutoAttack's `standard` suite runs it.

FAB walks to the decision boundary by repeatedly linearising it: at the current point x_k the boundary
between the true class y and the target t is approximated by the hyperplane
{z : g_k + <grad g_k, z - x_k> = 0}, g = z_t - z_y. Both x_k and the original point x are projected onto
that hyperplane intersected with the box [0, 1]^d (the minimal-norm step onto it, in the attack's norm),
and the next point is a mix of the two projections, overshooting slightly. Once a point is adversarial,
FAB steps back towards x, so that it ends close to the smallest perturbation on the boundary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    _TINY,
    Norm,
    _per_example,
    attack,
    check_count,
    coerce_norm,
    norms,
    project,
    steepest_step,
    succeeded,
)
from phalanx.errors import UsageError

# as fab_base.py: the norms of the two projection steps are floored at 1e-8 before alpha is formed
_MIN_STEP_NORM = 1e-8


# --- the projection onto {hyperplane} ∩ {box} -------------------------------------------------------

def smallest_level(breaks: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest lam >= 0 with G(lam) = sum_i weights_i * min(lam, breaks_i) >= target;
    +inf where even G(inf) = sum_i weights_i * breaks_i falls short of `target`.

    `breaks` and `weights` (rows, d) are >= 0, `target` (rows,). G is piecewise linear, continuous and
    non-decreasing with kinks at the breaks, so after one sort its value at every break is a cumulative
    sum; the answer lies on the first segment whose right end reaches `target`, where G is linear.
    """
    r, order = breaks.sort(dim=1)
    v = weights.gather(1, order)
    total = v.sum(dim=1, keepdim=True)
    below = (v * r).cumsum(dim=1)  # sum of w_i * b_i over the breaks up to the k-th
    above = total - v.cumsum(dim=1)  # G's slope right of the k-th break
    k = (below + r * above < target[:, None]).sum(dim=1, keepdim=True)  # breaks where G < target
    zero = torch.zeros_like(total)
    base = torch.cat([zero, below], dim=1).gather(1, k)
    slope = torch.cat([total, above], dim=1).gather(1, k)
    lam = (target[:, None] - base) / slope.clamp(min=_TINY)
    # the segment [r_{k-1}, r_k] the answer lies on; clamping only guards against rounding
    lo = torch.cat([zero, r], dim=1).gather(1, k)
    hi = torch.cat([r, torch.full_like(zero, math.inf)], dim=1).gather(1, k)
    lam = torch.minimum(torch.maximum(lam, lo), hi)
    return torch.where(k == r.shape[1], math.inf, lam).squeeze(1)


def project_hyperplane_box(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *,
                           norm: Norm | str) -> torch.Tensor:
    """Per row i, the minimal-`norm` step d with <w_i, p_i + d> = b_i and p_i + d in [0, 1]^d
    (Croce & Hein 2020: the projection onto a hyperplane with box constraints).

    `points` (rows, d) in [0, 1], `w` (rows, d), `b` (rows,). Every minimiser moves each coordinate
    towards the hyperplane, by at most its room r_i to the box's face: Linf d_i = sign(w_i) min(lam, r_i)
    (all free coordinates at the same size lam), L2 d_i = clip(mu w_i) = w_i min(mu, r_i / |w_i|) (the
    KKT conditions), with sign(w) flipped when the hyperplane lies below the point; lam or mu is the
    smallest level that reaches the hyperplane (`smallest_level`). Where the hyperplane misses the box,
    every coordinate with w_i != 0 moves by its whole room: the box corner nearest the hyperplane, as
    fab_projections.py does. Coordinates with w_i = 0 never move.
    """
    norm = coerce_norm(norm)
    gap = b - (w * points).sum(dim=1)  # <w, d> must equal this
    u = torch.where(gap[:, None] >= 0, w, -w)  # now <u, d> = |gap| >= 0: move along sign(u)
    room = torch.where(u > 0, 1 - points, torch.where(u < 0, points, torch.zeros_like(points)))
    if norm is Norm.LINF:
        breaks, weights, scale = room, u.abs(), u.sign()
    else:
        breaks = torch.where(u != 0, room / u.abs().clamp(min=_TINY), torch.zeros_like(room))
        weights, scale = u * u, u
    level = smallest_level(breaks, weights, gap.abs())
    return scale * torch.minimum(level[:, None], breaks)


# --- one FAB run --------------------------------------------------------------------------------------

def logit_gap_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_target - z_y at `x` per example (< 0 while y beats the target) and its input gradient:
    one forward and one backward, as fab_pt.py's targeted gradient (not the full Jacobian)."""
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        logits = model(x_req)
        gap = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(gap.sum(), x_req)
    return gap.detach(), grad


def fab_step(x_k: torch.Tensor, x: torch.Tensor, gap: torch.Tensor, grad: torch.Tensor, *, norm: Norm,
             alpha_max: float, eta: float) -> torch.Tensor:
    """One FAB step (Croce & Hein 2020, the biased gradient step with extrapolation): with d_k, d_0 the
    projections of x_k and x onto the linearised boundary ∩ box and
    alpha = min(|d_k| / (|d_k| + |d_0|), alpha_max),
    x_{k+1} = clip_[0,1]((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0))."""
    n = x_k.shape[0]
    w = grad.flatten(1)
    b = (w * x_k.flatten(1)).sum(dim=1) - gap  # the hyperplane gap + <grad, z - x_k> = 0
    # as fab_base.py: x_k and x projected onto the same hyperplane in one batched call
    d = project_hyperplane_box(torch.cat([x_k.flatten(1), x.flatten(1)]), torch.cat([w, w]),
                               torch.cat([b, b]), norm=norm).view(2 * n, *x_k.shape[1:])
    d_k, d_0 = d[:n], d[n:]
    size_k, size_0 = norms(d, norm).clamp(min=_MIN_STEP_NORM).split(n)
    # as fab_base.py: alpha from the two step sizes, biasing the step towards x, capped at alpha_max
    alpha = _per_example((size_k / (size_k + size_0)).clamp(0.0, alpha_max), x_k)
    # as fab_base.py: both projections extrapolated by eta, the mix clipped to the box
    return ((1 - alpha) * (x_k + eta * d_k) + alpha * (x + eta * d_0)).clamp(0.0, 1.0)


def fab_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
            *, eps: float, norm: Norm, steps: int, alpha_max: float, eta: float,
            beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` FAB steps from `start` towards the boundary between `y` and `target`; call within
    `attack_mode(model)`. Returns (fooled, x_adv): per example whether an iterate was misclassified
    within eps of `x`, and that iterate (else `x`).

    An example leaves the batch at its first misclassified iterate within eps, so later steps compute
    gradients only for the rest. The reference keeps going to shrink the perturbation further (it
    returns the smallest one it found), which cannot change whether the example counts as fooled.
    """
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    x_adv = x.clone()
    active = torch.arange(x.shape[0], device=x.device)
    x_k, x_a, y_a, t_a = start, x, y, target
    for _ in range(steps):
        if active.numel() == 0:
            break
        gap, grad = logit_gap_and_grad(model, x_k, y_a, t_a)
        x_k = fab_step(x_k, x_a, gap, grad, norm=norm, alpha_max=alpha_max, eta=eta)
        with torch.no_grad():
            # as fab_base.py: any misclassification counts, not only reaching the target
            adversarial = succeeded(model(x_k), y_a, targeted=False)
        # as fab_base.py's perturb: a point counts only within eps of x (norm <= eps)
        hit = adversarial & (norms(x_k - x_a, norm) <= eps)
        x_adv[active[hit]] = x_k[hit]
        fooled[active[hit]] = True
        # as fab_base.py: from an adversarial point, step back towards x by the factor beta
        x_k = torch.where(_per_example(adversarial, x_k), x_a + beta * (x_k - x_a), x_k)
        keep = ~hit
        active, x_k, x_a, y_a, t_a = active[keep], x_k[keep], x_a[keep], y_a[keep], t_a[keep]
    return fooled, x_adv


def random_start(x: torch.Tensor, *, eps: float, norm: Norm,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """As fab_base.py's later restarts: x plus a random direction scaled to `norm` eps / 2 (Linf:
    uniform(-1, 1) noise over its max; L2: a Gaussian direction), clipped to [0, 1]. The noise is
    drawn on the generator's device and moved to `x`'s, as `core.sample_in_ball`."""
    device = generator.device if generator is not None else x.device
    if norm is Norm.LINF:
        noise = 2 * torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype) - 1
        unit = noise / _per_example(norms(noise, norm).clamp(min=_TINY), noise)
    else:
        unit = steepest_step(torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype), norm)
    return (x + 0.5 * eps * unit.to(x.device)).clamp(0.0, 1.0)


# --- the attack ---------------------------------------------------------------------------------------

def _check_range(name: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and (value > lo if open_lo else value >= lo) and value <= hi):
        bracket = "(" if open_lo else "["
        raise UsageError(f"{name} must be a number in {bracket}{lo:g}, {hi:g}], got {value!r}")


def _fab_t_arguments(args: dict[str, Any]) -> None:
    for name in ("steps", "target_classes", "restarts"):
        check_count(name, args[name])
    _check_range("alpha_max", args["alpha_max"], 0.0, 1.0)
    _check_range("eta", args["eta"], 1.0, math.inf)
    _check_range("beta", args["beta"], 0.0, 1.0, open_lo=True)


@attack(check=_fab_t_arguments)
def fab_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm | str = "linf",
          steps: int = 100, target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1,
          eta: float = 1.05, beta: float = 0.9, generator: torch.Generator | None = None) -> torch.Tensor:
    """FAB-T (Croce & Hein 2020) as in AutoAttack's `standard` suite: for each of the `target_classes`
    classes with the highest clean logits other than the true class `y` (fewer if the model has fewer
    classes), `restarts` FAB runs of `steps` steps towards the boundary between `y` and that class.

    The first run starts at x, each later one at a random point eps / 2 away (from `generator`). Only
    examples the model still classifies correctly are attacked, and an example counts as fooled when a
    run reaches a misclassified point within eps of it (Linf or L2 `norm`). Returned (same shape as
    x): that point per fooled example, else x itself; always in the eps ball and [0, 1].

    Args: eps >= 0; steps, target_classes, restarts integers >= 1; alpha_max in [0, 1] (the largest
    pull towards x), eta >= 1 (the overshoot), beta in (0, 1] (the step back from an adversarial point),
    the paper's and fab_base.py's defaults 0.1, 1.05, 0.9.
    Example: ``x_adv = fab_t(model, x, y, eps=8/255, norm="linf")``.
    """
    y = y.to(device=x.device, dtype=torch.long)
    x_adv = x.clone()
    if x.shape[0] == 0 or eps == 0:  # nothing to attack, or no misclassified point within eps
        return x_adv
    with torch.no_grad():
        logits = model(x)
    # as fab_base.py: only the correctly classified points are attacked
    robust = ~succeeded(logits, y, targeted=False)
    count = min(target_classes, logits.shape[1] - 1)
    # as fab_base.py: the targets are the 2nd to (count + 1)-th highest clean logits
    targets = logits.scatter(1, y[:, None], -math.inf).topk(count, dim=1).indices
    for j in range(count):
        for restart in range(restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                return project(x_adv, x, eps=eps, norm=norm)
            x_i = x[idx]
            # as fab_base.py: the first restart starts at the clean point
            start = x_i if restart == 0 else random_start(x_i, eps=eps, norm=norm, generator=generator)
            fooled, found = fab_run(model, x_i, y[idx], targets[idx, j], start, eps=eps, norm=norm,
                                    steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
            x_adv[idx[fooled]] = found[fooled]
            robust[idx[fooled]] = False
    return project(x_adv, x, eps=eps, norm=norm)
