"""The template every attack is written on: arguments, threat model, loss, model handling, the step loop.

An attack only chooses its starting point, its step and its loop length; everything that must
hold for all attacks lives here once:

- `attack`: the decorator every attack function carries. It checks the arguments all attacks
  share (eps, x in [0, 1], y one class per example; `norm`, `loss` and `ensemble` coerced from
  strings), runs the attack with the model in `attack_mode`, and checks the post-condition: x_adv
  shaped like x, in [0, 1] and within the attack's budget (eps) of x in its norm;
- `project`: the threat model (the eps ball around `x` in the attack's norm, and [0, 1]);
- `Objective` / `loss_objective` (from losses.py): the per-example value the attacker *ascends*
  (CE, the CW margin or DLR, negated for targeted attacks, where `y` is the target class), on the
  model's output or, for an ensemble, on another function of its members;
- `attack_mode`: the models in eval mode with frozen parameters (`frozen_parameters`) during the
  attack, restored after;
- `iterate`: the generic loop x <- project(x + alpha * step(transform(grad objective))).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import nn

from phalanx.attacks.losses import (  # noqa: F401  (re-exported: attacks import them from core)
    Ensemble,
    Loss,
    Objective,
    attack_objective,
    coerce_ensemble,
    coerce_loss,
    input_gradient,
    loss_objective,
    objective_and_logits,
    objective_gradient,
    per_example_loss,
    targeted_dlr,
)
from phalanx.enums import coerce_enum
from phalanx.errors import UsageError

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
        raise UsageError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_eps(eps: float) -> None:
    _check_number("eps", eps, positive=False)


def check_alpha(alpha: float) -> None:
    _check_number("alpha", alpha, positive=True)


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """`x` a floating batch of pixels in [0, 1]; `y` one integer class per example."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise UsageError(f"x must be a floating-point tensor of shape (batch, ...), got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise UsageError(f"y must be a 1-D integer tensor of class indices, got "
                         f"{type(y).__name__} {getattr(y, 'dtype', '')} {tuple(getattr(y, 'shape', ()))}")
    if y.shape[0] != x.shape[0]:
        raise UsageError(f"x and y must hold the same number of examples, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if x.numel() > 0:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise UsageError(f"x must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]")


def check_radii(eps: torch.Tensor, x: torch.Tensor) -> None:
    """Per-example budgets: one finite radius >= 0 per example of `x`, a 1-D floating tensor."""
    if eps.dim() != 1 or eps.shape[0] != x.shape[0] or not eps.is_floating_point():
        raise UsageError(f"eps must be a number or one radius per example (a floating tensor of shape "
                         f"({x.shape[0]},)), got {eps.dtype} {tuple(eps.shape)}")
    if eps.numel() > 0 and not bool((torch.isfinite(eps) & (eps >= 0)).all()):
        raise UsageError(f"eps must hold finite radii >= 0, got values in [{float(eps.min()):g}, "
                         f"{float(eps.max()):g}]")


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
def frozen_parameters(*models: nn.Module) -> Iterator[None]:
    """The models' parameters require no gradient inside the block (backward computes input
    gradients only); every parameter's `requires_grad` and `.grad` restored afterwards, also on
    exception. The one freeze helper: `attack_mode` and feature distillation use it."""
    saved = [(p, p.requires_grad, p.grad) for model in models for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


@contextlib.contextmanager
def attack_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters (`frozen_parameters`) inside the block; every module's
    train/eval flag and every parameter's `requires_grad` and `.grad` restored afterwards, also on
    exception. Takes one model or several (an ensemble's members).

    Eval mode makes the attacked function deterministic (no dropout, BatchNorm running
    statistics neither used from the batch nor updated); frozen parameters mean backward
    computes only the input gradient.
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        with frozen_parameters(*models):
            for model in models:
                model.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# --- the generic iterative attack ----------------------------------------------------------------

def iterate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor, *, eps: float,
            alpha: float, steps: int, norm: Norm, objective: Objective | None = None,
            transform: GradTransform | None = None) -> torch.Tensor:
    """`steps` projected steepest-ascent steps from `x_start`: x <- project(x + alpha * step(g)).

    `g` is the input gradient of `objective(model, x, y)` (per-example values to ascend; default
    `loss_objective()`, the untargeted cross-entropy of the model's output), passed through
    `transform` when given (a hook for momentum or gradient smoothing; it may keep state in a
    closure). Call within `attack_mode(model)`. Returns the last iterate, detached.
    """
    objective = loss_objective() if objective is None else objective
    x_adv = x_start.detach()
    for _ in range(steps):
        grad = objective_gradient(objective, model, x_adv, y)
        if transform is not None:
            grad = transform(grad)
        x_adv = project(x_adv + alpha * steepest_step(grad, norm), x, eps=eps, norm=norm)
    return x_adv.detach()


# --- the decorator every attack carries --------------------------------------------------------------

# (eps, the attack's arguments by name) -> the largest perturbation, in its norm, the attack may make
Budget = Callable[[Any, Mapping[str, Any]], Any]
# the attack's arguments by name -> None: checks the attack's own arguments and fills in those that
# default to a function of others (PGD's step from eps and steps), before the model is touched
ArgumentCheck = Callable[[dict[str, Any]], None]

# Float slack of the post-condition, relative to the budget (and absolute below 1): rounding in
# x + delta - x, far below any perturbation a wrong projection would leave.
BUDGET_SLACK = 1e-5

# String arguments every attack coerces the same way, by parameter name.
_COERCE: dict[str, Callable[[Any], Enum]] = {
    "norm": coerce_norm, "loss": coerce_loss, "ensemble": coerce_ensemble,
}

AttackFn = TypeVar("AttackFn", bound=Callable[..., torch.Tensor])


def eps_ball(eps: Any, params: Mapping[str, Any]) -> Any:
    """The usual threat model: perturbations of norm at most eps (a number, or one per example)."""
    return eps


def attack(fn: AttackFn | None = None, *, norm: Norm | None = None, budget: Budget = eps_ball,
           check: ArgumentCheck | None = None) -> Any:
    """Makes `fn(model, x, y, *, eps, ...) -> x_adv` an attack: what every attack must do, done once.

    Before the call, and before the model is touched: `norm`, `loss` and `ensemble` arguments are
    coerced from strings; eps is checked (a number >= 0, or one radius per example), x and y by
    `check_inputs`; x is detached; then `check` sees every argument by name, refuses the attack's
    own bad ones (UsageError) and may fill in defaults derived from others. During the call: the
    model (or, when the first argument is a sequence of models, each of them) is in `attack_mode`.
    After it: x_adv must have x's shape, lie in [0, 1] and within `budget(eps, arguments)` of x in
    the attack's norm (its `norm` argument, else the decorator's `norm`), up to `BUDGET_SLACK`;
    anything else is a bug in the attack and raises AssertionError.

    `budget` is kept on the decorated function (`fn.budget`) for the registry's budget checks.
    Use as ``@attack`` or ``@attack(norm=Norm.LINF, budget=..., check=...)``.
    """
    def decorate(fn: AttackFn) -> AttackFn:
        signature = inspect.signature(fn)
        model_name, x_name, y_name = list(signature.parameters)[:3]
        if "norm" not in signature.parameters and norm is None:
            raise TypeError(f"attack {fn.__name__} takes no norm argument: give @attack(norm=...)")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            arguments = call.arguments
            for name, coerce in _COERCE.items():
                if name in arguments:
                    arguments[name] = coerce(arguments[name])
            x, eps = arguments[x_name], arguments["eps"]
            if not isinstance(eps, torch.Tensor):
                check_eps(eps)
            check_inputs(x, arguments[y_name])
            if isinstance(eps, torch.Tensor):
                check_radii(eps, x)
            x = arguments[x_name] = x.detach()
            if check is not None:
                check(arguments)
            model = arguments[model_name]
            models = (model,) if isinstance(model, nn.Module) else tuple(model)
            with attack_mode(*models):
                x_adv = fn(*call.args, **call.kwargs)
            check_threat_model(x_adv, x, budget=budget(eps, arguments), norm=arguments.get("norm", norm),
                               attack_name=fn.__name__)
            return x_adv

        run.budget = budget  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)


def check_threat_model(x_adv: torch.Tensor, x: torch.Tensor, *, budget: float | torch.Tensor, norm: Norm,
                       attack_name: str) -> None:
    """The post-condition of every attack (see `attack`); AssertionError naming what broke."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise AssertionError(f"{attack_name} returned {tuple(getattr(x_adv, 'shape', ()))} for x of shape "
                             f"{tuple(x.shape)}")
    if x_adv.numel() == 0:
        return
    dist = norms(x_adv.detach() - x, norm)
    limit = torch.as_tensor(budget, dtype=dist.dtype, device=dist.device)
    excess = dist - limit * (1 + BUDGET_SLACK) - BUDGET_SLACK
    lo, hi = x_adv.detach().amin(), x_adv.detach().amax()
    if not bool((excess <= 0).all() & (lo >= 0) & (hi <= 1)):
        raise AssertionError(f"{attack_name} left its threat model: a {norm.value} perturbation "
                             f"{float(excess.max()):.3g} beyond its budget, or pixels outside [0, 1] "
                             f"(values in [{float(lo):g}, {float(hi):g}])")
