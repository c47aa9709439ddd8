"""The transfer attacks the DVERGE authors craft on surrogate ensembles: M-DI²-FGSM and SGM.

Yang et al. (NeurIPS 2020, section 5 and appendix A) attack baseline ResNet-20 ensembles with
momentum PGD, M-DI²-FGSM (Xie et al. 2019) and SGM (Wu et al. 2020), with the CE and the CW loss,
and transfer the examples to the defended ensemble. Their repository ships only the crafted
examples and the evaluation (eval/eval_bbox.py), not the crafting code, so both attacks are written
here from the papers, on the loop in core.py; the registry entries say where each default comes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from math import inf
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks.core import (
    Loss,
    Norm,
    _check_number,
    attack,
    check_alpha,
    check_count,
    iterate,
    loss_objective,
)
from phalanx.attacks.fgsm_family import l1_momentum
from phalanx.errors import UsageError
from phalanx.models.mixture import Mixture
from phalanx.models.resnet import BasicBlock


def transfer_step(eps: float) -> float:
    """The default step of both attacks: eps / 5, the PGD step of the DVERGE authors' evaluation code
    (eval/eval_transferability.py, eval/eval_wbox.py); assumed for their transfer set, whose crafting
    code is not public."""
    return eps / 5


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UsageError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_square_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise UsageError(f"input diversity needs a batch of square images (batch, channels, size, size), "
                         f"got shape {tuple(x.shape)}")


# --- M-DI²-FGSM -----------------------------------------------------------------------------------

def input_diversity(x: torch.Tensor, *, p: float, resize_rate: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Xie et al. (2019)'s random transform T(x; p), on a batch of square images of side `size`.

    With probability p: resize to rnd x rnd (nearest neighbour, as theirs), rnd uniform in
    [size, bound) with bound = max(size + 1, int(size * resize_rate)); zero-pad at a uniformly
    random offset to bound x bound; resize back to size x size (bilinear), so that models with a
    fixed input size accept it. Otherwise x itself. Xie et al. draw once per batch (299 -> [299, 330));
    so does this. The draws come from `generator` (on its device) when given. Differentiable in x.
    """
    _check_square_images(x)
    device = generator.device if generator is not None else torch.device("cpu")
    if not float(torch.rand((), generator=generator, device=device)) < p:
        return x
    size = x.shape[-1]
    bound = max(size + 1, int(size * resize_rate))
    rnd = int(torch.randint(size, bound, (), generator=generator, device=device))
    top = int(torch.randint(0, bound - rnd + 1, (), generator=generator, device=device))
    left = int(torch.randint(0, bound - rnd + 1, (), generator=generator, device=device))
    rescaled = F.interpolate(x, size=(rnd, rnd), mode="nearest")
    padded = F.pad(rescaled, (left, bound - rnd - left, top, bound - rnd - top), value=0.0)
    return F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False)


class _Diversified(nn.Module):
    """`model` seen through a fresh draw of `input_diversity` at every call (one per attack step)."""

    def __init__(self, model: nn.Module, *, p: float, resize_rate: float, generator: torch.Generator | None):
        super().__init__()
        self.model = model
        self.p, self.resize_rate, self.generator = p, resize_rate, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diverse = input_diversity(x, p=self.p, resize_rate=self.resize_rate, generator=self.generator)
        return self.model(diverse)


def _transfer_arguments(args: dict[str, Any]) -> None:
    """The arguments both transfer attacks share, checked; the step defaults to `transfer_step(eps)`."""
    check_count("steps", args["steps"])
    if args["alpha"] is None:
        args["alpha"] = transfer_step(args["eps"])
    if args["eps"] > 0 or args["alpha"] != 0:
        check_alpha(args["alpha"])
    _check_number("mu", args["mu"], positive=False)


def _mdi2fgsm_arguments(args: dict[str, Any]) -> None:
    _transfer_arguments(args)
    _check_fraction("p", args["p"])
    resize_rate = args["resize_rate"]
    number = not isinstance(resize_rate, bool) and isinstance(resize_rate, (int, float))
    if not (number and 1 <= resize_rate < inf):
        raise UsageError(f"resize_rate must be a finite number >= 1 (T enlarges, then pads), "
                         f"got {resize_rate!r}")
    _check_square_images(args["x"])


def _sgm_arguments(args: dict[str, Any]) -> None:
    _transfer_arguments(args)
    _check_fraction("gamma", args["gamma"])


@attack(check=_mdi2fgsm_arguments)
def mdi2fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
             steps: int = 100, mu: float = 1.0, p: float = 0.5, resize_rate: float = 1.1,
             norm: Norm | str = "linf", loss: Loss | str = "ce", targeted: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """M-DI²-FGSM (Xie et al. 2019, Algorithm 1): MI-FGSM whose gradient is taken through the random
    transform T(x_t; p) of `input_diversity`: g_{t+1} = mu * g_t + grad / ||grad||_1 with
    grad = d loss(model(T(x_t; p)), y) / d x_t, x_{t+1} = project(x_t + alpha * sign(g_{t+1})) onto
    the eps ball and [0, 1]. From x itself (no random start); with p = 0 it is MI-FGSM with step alpha.

    Args: as `mifgsm`, plus alpha > 0 (default `transfer_step(eps)` = eps / 5), 0 <= p <= 1,
    resize_rate >= 1, `loss` "ce" or "cw" (the DVERGE authors use both) and a generator for T's draws.
    Images must be square, (B, C, size, size). Returns x_adv shaped like x.
    Example: ``x_adv = mdi2fgsm(surrogate, x, y, eps=0.03, generator=torch.Generator().manual_seed(0))``.
    """
    diversified = _Diversified(model, p=p, resize_rate=resize_rate, generator=generator)
    return iterate(diversified, x, y, x, eps=eps, alpha=alpha, steps=steps, norm=norm,
                   objective=loss_objective(loss, targeted=targeted), transform=l1_momentum(mu))


# --- SGM ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def skip_gradient(model: nn.Module, gamma: float) -> Iterator[None]:
    """Inside, backpropagation through every residual block of `model` multiplies the gradient of
    the block's residual branch by gamma and leaves its skip connection whole: the block
    z' = z + f(z) (or shortcut(z) + f(z)) backpropagates as shortcut'(z) + gamma * f'(z), so that
    d loss / d x = d loss / d z_L * prod_i (shortcut_i' + gamma * f_i') * d z_0 / d x (Wu et al. 2020,
    section 3). The forward pass is unchanged.

    Every phalanx ResNet block in `model` is hooked, so a Mixture of ResNets has all its members
    hooked; its members run one call each inside (a stacked copy would bypass the hooks). Hooks and
    Mixture settings are restored on exit, also on exception. A model without residual blocks is
    refused with a UsageError (a ValueError), before anything is changed.
    """
    _check_fraction("gamma", gamma)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if not blocks:
        raise UsageError(f"SGM needs a ResNet surrogate (a model with residual blocks: phalanx's ResNet or a "
                         f"Mixture of them); {type(model).__name__} has none")
    mixtures = [(m, m.stacked) for m in model.modules() if isinstance(m, Mixture)]
    calls = [0]

    def decay_residual_branch(module: nn.Module, inputs: tuple[torch.Tensor, ...],
                              output: torch.Tensor) -> None:
        calls[0] += 1
        if output.requires_grad:
            output.register_hook(lambda grad: gamma * grad)

    # the residual branch f ends in bn2, whose output is used only in the sum with the shortcut
    handles = []
    try:
        for mixture, _ in mixtures:
            mixture.stacked = False
        handles = [block.bn2.register_forward_hook(decay_residual_branch) for block in blocks]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for mixture, stacked in mixtures:
            mixture.stacked = stacked
    if calls[0] == 0:
        raise RuntimeError(f"SGM's hooks never ran: {type(model).__name__} holds residual blocks but its "
                           f"forward did not call them")


@attack(check=_sgm_arguments)
def sgm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
        steps: int = 100, gamma: float = 0.2, mu: float = 0.0, norm: Norm | str = "linf",
        loss: Loss | str = "ce", targeted: bool = False) -> torch.Tensor:
    """SGM (Wu et al. 2020, "Skip Connections Matter"): the iterative attack x_{t+1} =
    project(x_t + alpha * sign(g_t)) from x (no random start, as the SGM authors' attack), where g_t is
    the input gradient backpropagated with the residual branches decayed by gamma (`skip_gradient`);
    with mu > 0, g_t is MI-FGSM's momentum (`l1_momentum(mu)`) of those gradients. With gamma = 1 it is
    that plain attack (PGD without random start, or MI-FGSM with step alpha).

    Args: model a ResNet or a model holding ResNets (a Mixture), else UsageError; alpha > 0 (default
    `transfer_step(eps)` = eps / 5); 0 <= gamma <= 1; mu >= 0; `loss` "ce" or "cw".
    Returns x_adv shaped like x.
    Example: ``x_adv = sgm(resnet_ensemble, x, y, eps=0.03)``.
    """
    with skip_gradient(model, gamma):
        return iterate(model, x, y, x, eps=eps, alpha=alpha, steps=steps, norm=norm,
                       objective=loss_objective(loss, targeted=targeted),
                       transform=l1_momentum(mu) if mu > 0 else None)
