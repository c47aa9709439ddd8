"""Feature distillation (DVERGE, report eq. 1): an image near `x_source` whose features at one
layer match those of `x_target`.

    x' = argmin_z || f^l(z) - f^l(x_target) ||_2^2   s.t.  || z - x_source ||_inf <= eps, z in [0, 1]

solved by signed-gradient descent, optionally with the authors' momentum (per-example
L1-normalized gradient accumulated as g = mu * g + grad / ||grad||_1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.attacks.core import frozen_parameters
from phalanx.models.stacked import StackedMembers


@dataclass(frozen=True)
class DistillConfig:
    """Distillation parameters; defaults are the DVERGE authors' (arguments.py: --distill-eps 0.07,
    --distill-alpha 0.007, --distill-steps 10, momentum on with mu=1, no random start; and
    train_dverge.py: before_relu=True). The report's eps 8/255 is `DistillConfig(eps=8/255)`."""

    eps: float = 0.07
    step_size: float = 0.007
    steps: int = 10
    momentum: float | None = 1.0
    pre_activation: bool = True
    random_start: bool = False

    def __post_init__(self) -> None:
        _check(self.eps, self.step_size, self.steps, self.momentum)


def _check(eps: float, step_size: float, steps: int, momentum: float | None) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if momentum is not None and not momentum >= 0:
        raise ValueError(f"momentum must be None (off) or >= 0, got {momentum}")


def signed_descent(
    grad_fn: Callable[[torch.Tensor], torch.Tensor],
    x_source: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    momentum: float | None,
    random_start: bool,
    generator: torch.Generator | None,
    channel_groups: int = 1,
) -> torch.Tensor:
    """Descend along `grad_fn(x)` (a gradient of the objective w.r.t. x) by signed steps inside the
    Linf ball around `x_source` and [0, 1], as the authors' Linf_distillation.

    Only the direction of the gradient per example matters (sign, and the per-example L1
    normalization of the momentum), so `grad_fn` may return it up to a positive factor per
    example. x_source is (B, ...) with examples along the first dimension. With
    `channel_groups` G > 1, x is (B, G*C, H, W) holding G independent problems side by side
    (models/stacked.py): the momentum is normalized per example and group, and a random start
    draws each group's noise in turn, as G separate calls would.
    """
    x_nat = x_source.detach()
    lo, hi = (x_nat - eps).clamp_(min=0.0), (x_nat + eps).clamp_(max=1.0)
    x = x_nat.clone()
    if random_start:
        shape = (x.shape[0], x.shape[1] // channel_groups, *x.shape[2:])
        noise = torch.cat([torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
                           for _ in range(channel_groups)], dim=1)
        x = x + (2 * noise - 1) * eps
    # projection onto the ball and [0, 1] by one clamp between precomputed bounds (lo/hi
    # combine both), as the authors' min/max; core.project's Linf case up to rounding, but one
    # elementwise op per step instead of five
    x = torch.clamp(x, lo, hi)
    g = torch.zeros_like(x) if momentum is not None else None
    for _ in range(steps):
        grad = grad_fn(x.requires_grad_(True))
        x = x.detach()
        with torch.no_grad():
            if g is not None:
                if momentum != 1.0:  # the authors' mu = 1 needs no pass over g
                    g.mul_(momentum)
                g.addcdiv_(grad, _l1_norms(grad, channel_groups))
                grad = g
            # the distance is minimized: step against the gradient
            x.add_(grad.sign(), alpha=-step_size)
            torch.clamp(x, lo, hi, out=x)
    return x.detach()


def _l1_norms(grad: torch.Tensor, channel_groups: int) -> torch.Tensor:
    """The L1 norm of each example's (and channel group's) gradient, broadcastable against it."""
    if channel_groups == 1:
        return grad.abs().flatten(1).sum(1).clamp_(min=1e-12).view(-1, *([1] * (grad.dim() - 1)))
    b, c = grad.shape[:2]
    per_group = grad.abs().sum(dim=(2, 3)).view(b, channel_groups, -1).sum(2).clamp_(min=1e-12)
    return per_group.repeat_interleave(c // channel_groups, dim=1).view(b, c, 1, 1)


def distill(
    model: nn.Module,
    x_source: torch.Tensor,
    x_target: torch.Tensor,
    *,
    layer: str,
    eps: float,
    step_size: float,
    steps: int,
    pre_activation: bool = True,
    momentum: float | None = 1.0,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Distilled feature x'_{f^l}(x_target, x_source) of report eq. 1 for a `Classifier` `model`.

    Looks like `x_source`, has `model.features(., layer)` close to those of `x_target` (squared
    L2 distance; the authors' nn.MSELoss differs by a constant factor, which signed steps and
    the L1-normalized momentum ignore). The target features are computed
    once, without grad; parameters' `.grad` and `requires_grad` are left as found. The model's
    train/eval mode is left as found and used as is: the authors distill with the members in
    train mode (train_dverge.py calls m.train() before distilling), so BatchNorm uses batch
    statistics (and updates its running statistics) during DVERGE training.

    Shapes: x_source and x_target (B, C, H, W) in [0, 1]; returns (B, C, H, W).
    Example: ``distill(f, xs, xt, layer="conv2", eps=0.07, step_size=0.007, steps=10)``.
    """
    _check(eps, step_size, steps, momentum)
    _check_same_shape(x_source, x_target)
    with frozen_parameters(model):
        return _match_features(
            lambda x: model.features(x, layer, pre_activation=pre_activation), x_source, x_target, eps=eps,
            step_size=step_size, steps=steps, momentum=momentum, random_start=random_start, generator=generator,
        )


def _check_same_shape(x_source: torch.Tensor, x_target: torch.Tensor) -> None:
    if x_source.shape != x_target.shape:
        raise ValueError(f"x_source and x_target must have the same shape, got {tuple(x_source.shape)} "
                         f"and {tuple(x_target.shape)}")


def _match_features(features: Callable[[torch.Tensor], torch.Tensor], x_source: torch.Tensor,
                    x_target: torch.Tensor, *, eps: float, step_size: float, steps: int, momentum: float | None,
                    random_start: bool, generator: torch.Generator | None, channel_groups: int = 1) -> torch.Tensor:
    """Eq. 1 for a feature function whose parameters the caller has frozen: the target features
    once, without grad, then `signed_descent` on 1/2 ||features(x) - target||^2."""
    with torch.no_grad():
        target = features(x_target)

    def grad_fn(x: torch.Tensor) -> torch.Tensor:
        # the gradient of 1/2 ||f(x) - target||^2, i.e. of the authors' MSE up to the
        # constant factor 2 / numel, without building the loss
        with torch.enable_grad():
            current = features(x)
            (grad,) = torch.autograd.grad(current, x, grad_outputs=current.detach() - target)
        return grad

    return signed_descent(grad_fn, x_source, eps=eps, step_size=step_size, steps=steps, momentum=momentum,
                          random_start=random_start, generator=generator, channel_groups=channel_groups)


def distill_with(model: nn.Module, x_source: torch.Tensor, x_target: torch.Tensor, *, layer: str,
                 config: DistillConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """`distill` with its parameters taken from a `DistillConfig`."""
    return distill(
        model, x_source, x_target, layer=layer, eps=config.eps, step_size=config.step_size,
        steps=config.steps, pre_activation=config.pre_activation, momentum=config.momentum,
        random_start=config.random_start, generator=generator,
    )


def distill_stacked(stack: StackedMembers, x_source: torch.Tensor, x_target: torch.Tensor, *, layer: str,
                    config: DistillConfig, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """`distill_with` for every member of `stack` at once, from the same source and target batches.

    Returns each member's distilled batch, as M calls of `distill_with` would (the same random
    start draws, in member order), computed by one stacked forward and backward per step.
    """
    _check_same_shape(x_source, x_target)
    n = len(stack)
    with frozen_parameters(*stack.members), stack.parameters_fixed():
        distilled = _match_features(
            lambda x: stack.features(x, layer, pre_activation=config.pre_activation),
            stack.stack([x_source] * n), stack.stack([x_target] * n), eps=config.eps, step_size=config.step_size,
            steps=config.steps, momentum=config.momentum, random_start=config.random_start, generator=generator,
            channel_groups=n,
        )
    return stack.unstack(distilled)
