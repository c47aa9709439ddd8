"""The template every attack is written on: threat model, loss, model handling, the step loop.

An attack only chooses its starting point, its step and its loop length; everything that must
hold for all attacks lives here once:

- `project`: the threat model (the eps ball around `x` in the attack's norm, and [0, 1]);
- `attack_objective` / `objective_and_logits` (from losses.py): the per-example loss the attacker
  *ascends* (CE, the CW margin or DLR, negated for targeted attacks, where `y` is the target
  class), on the model's output or, for an ensemble, on another function of its members;
- `attack_mode`: the model in eval mode with frozen parameters during the attack, restored after;
- `iterate`: the generic loop x <- project(x + alpha * step(transform(grad))).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from enum import Enum

import torch
from torch import nn

from phalanx.attacks.losses import (  # noqa: F401  (re-exported: attacks import them from core)
    Ensemble,
    Loss,
    attack_objective,
    coerce_ensemble,
    coerce_loss,
    input_gradient,
    objective_and_logits,
    per_example_loss,
    targeted_dlr,
)
from phalanx.enums import coerce_enum

GradTransform = Callable[[torch.Tensor], torch.Tensor]

# Guards the division by a per-example gradient norm that can be exactly zero.
_TINY = 1e-12


class Norm(str, Enum):
    """The norm of the threat model's ball."""

    LINF = "linf"
    L2 = "l2"


def coerce_norm(norm: Norm | str) -> Norm:
    return coerce_enum(Norm, norm, "norm")


# --- argument checks (one message format for every attack) ------------------------------------

def _check_number(name: str, value: float, *, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_eps(eps: float) -> None:
    _check_number("eps", eps, positive=False)


def check_alpha(alpha: float) -> None:
    _check_number("alpha", alpha, positive=True)


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """`x` a floating batch of pixels in [0, 1]; `y` one integer class per example."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...), got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must be a 1-D integer tensor of class indices, got "
                         f"{type(y).__name__} {getattr(y, 'dtype', '')} {tuple(getattr(y, 'shape', ()))}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if x.numel() > 0:
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"x must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]")


# --- the threat model ----------------------------------------------------------------------------

def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape one value per example to broadcast against a batch shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example of a batch: shape (batch,)."""
    return t.flatten(1).norm(p=2, dim=1)


def norms(delta: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """The `norm` (Linf or L2) of each example of a batch: shape (batch,)."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if coerce_norm(norm) is Norm.LINF else flat.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, *, eps: float, norm: Norm | str) -> torch.Tensor:
    """`x_adv` moved into the threat model: the `norm` ball of radius eps around `x`, and [0, 1].

    The ball first, then the pixel range: clamping moves every coordinate towards `x`'s (which
    lies in [0, 1]), so the result stays in the ball. For Linf this is the exact projection onto
    the intersection; for L2 it is the usual (foolbox, torchattacks) approximation of it.
    """
    norm = coerce_norm(norm)
    delta = x_adv - x
    if norm is Norm.LINF:
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / l2_norms(delta).clamp(min=_TINY)).clamp(max=1.0)
        delta = delta * _per_example(scale, delta)
    return (x + delta).clamp(0.0, 1.0)


def steepest_step(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The unit-norm direction of steepest ascent: sign(grad) for Linf, grad / ||grad||_2 for L2.

    An example whose gradient is zero gets a zero step under both norms.
    """
    if norm is Norm.LINF:
        return grad.sign()
    return grad / _per_example(l2_norms(grad).clamp(min=_TINY), grad)


def sample_in_ball(x: torch.Tensor, *, eps: float, norm: Norm,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random point of the eps ball around `x`, projected into [0, 1].

    Linf: uniform(-eps, eps) per pixel, then clamp (Madry et al. 2018; the DVERGE authors' Linf_PGD).
    L2: uniform in the ball, i.e. a Gaussian direction scaled to radius eps * U^(1/d), d pixels.
    The noise is drawn on the generator's device and moved to `x`'s, so a seed gives the same
    start on any device.
    """
    device = generator.device if generator is not None else x.device
    if norm is Norm.LINF:
        u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
        delta = (2 * u - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        u = torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype)
        radius = eps * u.pow(1.0 / max(x[0].numel(), 1))
        delta = steepest_step(direction, Norm.L2) * _per_example(radius, direction)
    return project(x + delta.to(x.device), x, eps=eps, norm=norm)


# --- success ----------------------------------------------------------------------------

def succeeded(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool) -> torch.Tensor:
    """Per example: misclassified (untargeted) or classified as the target `y` (targeted)."""
    hit = logits.argmax(dim=1) == y
    return hit if targeted else ~hit


def is_worse_case(success: torch.Tensor, value: torch.Tensor, best_success: torch.Tensor,
                  best_value: torch.Tensor) -> torch.Tensor:
    """Per example: does a candidate beat the best so far for the attacker (across restarts)?

    A success beats a failure and is never replaced; between two failures the higher
    objective wins.
    """
    return (success & ~best_success) | (~best_success & ~success & (value > best_value))


# --- the model during an attack --------------------------------------------------------------

@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside the block; every module's train/eval flag and every
    parameter's `requires_grad` and `.grad` restored afterwards, also on exception.

    Eval mode makes the attacked function deterministic (no dropout, BatchNorm running
    statistics neither used from the batch nor updated); frozen parameters mean backward
    computes only the input gradient.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


# --- the generic iterative attack ----------------------------------------------------------------

def iterate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor, *, eps: float,
            alpha: float, steps: int, norm: Norm, loss: Loss = Loss.CE, targeted: bool = False,
            transform: GradTransform | None = None, ensemble: Ensemble = Ensemble.OUTPUT) -> torch.Tensor:
    """`steps` projected steepest-ascent steps from `x_start`: x <- project(x + alpha * step(g)).

    `g` is the input gradient of the attack objective (of `ensemble`, see losses.py), passed through
    `transform` when given (a hook for momentum or gradient smoothing; it may keep state in a closure). Call within
    `attack_mode(model)`. Returns the last iterate, detached.
    """
    x_adv = x_start.detach()
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, loss=loss, targeted=targeted, ensemble=ensemble)
        if transform is not None:
            grad = transform(grad)
        x_adv = project(x_adv + alpha * steepest_step(grad, norm), x, eps=eps, norm=norm)
    return x_adv.detach()
