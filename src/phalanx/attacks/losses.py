"""What an attacker ascends: per-example losses on logits, and the objectives that attack an
ensemble through something other than its averaged output.

A Mixture's output is log(mean_i softmax(z_i)). When members are confident, the softmax
saturates and the gradient of a loss on that output nearly vanishes, so attacks through it alone
are weak exactly on the ensembles phalanx trains (the attack-suite issue measured 10-20 points).
`Ensemble` names the other ways in: the mean of the members' logits, the sum of the members'
losses, and MORA's member reweighting (Yu et al., NeurIPS 2022). Whatever the objective, success
is always judged on the model's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import nn

from phalanx.enums import coerce_enum
from phalanx.errors import UsageError
from phalanx.models.mixture import mixture_log_probs


class Loss(str, Enum):
    """Per-example losses an attack can ascend."""

    CE = "ce"  # cross-entropy
    CW = "cw"  # Carlini & Wagner (2017) margin, their f_6 without the confidence clamp
    DLR = "dlr"  # Croce & Hein (2020) difference of logits ratio, eq. 5 (targeted: eq. 6, see `targeted_dlr`)


class Ensemble(str, Enum):
    """Which function of an ensemble the loss is taken on (see the module docstring)."""

    OUTPUT = "output"  # the model's own output; for a Mixture, log of the mean softmax
    MEAN_LOGITS = "mean-logits"  # loss(mean_i z_i)
    MEMBER_SUM = "member-sum"  # sum_i loss(z_i)
    MORA = "mora"  # loss of MORA's reweighted combination (`mora_logits`)


def coerce_loss(loss: Loss | str) -> Loss:
    return coerce_enum(Loss, loss, "loss")


def coerce_ensemble(ensemble: Ensemble | str) -> Ensemble:
    return coerce_enum(Ensemble, ensemble, "ensemble objective")


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
    """The loss of each example: CE, the CW margin max_{j != y} z_j - z_y (> 0 iff misclassified),
    or DLR, that margin over z_pi1 - z_pi3 (Croce & Hein 2020, eq. 5; z_pi sorted decreasingly).

    DLR is invariant to shifting and rescaling the logits and needs at least 3 classes.
    """
    if loss is Loss.CE:
        return nn.functional.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    margin = others.amax(dim=1) - true
    if loss is Loss.CW:
        return margin
    if logits.shape[1] < 3:
        raise UsageError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    return margin / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss the attacker ascends (Croce & Hein 2020, eq. 6), per example:
    (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), y the true class and t the target.

    It needs at least 4 classes.
    """
    if logits.shape[1] < 4:
        raise UsageError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return (z_t - z_y) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def attack_objective(logits: torch.Tensor, y: torch.Tensor, *, loss: Loss, targeted: bool) -> torch.Tensor:
    """What the attacker maximizes, per example: the loss on the true class, or, when
    `targeted`, minus the loss on the target class `y`."""
    value = per_example_loss(logits, y, loss)
    return -value if targeted else value


# --- ensemble objectives -------------------------------------------------------------------------

def _top2_gap(t: torch.Tensor) -> torch.Tensor:
    top = t.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def mora_logits(member_logits: torch.Tensor, y: torch.Tensor, *, mix: float = 0.9) -> torch.Tensor:
    """MORA's combined logits (Yu et al., NeurIPS 2022; the authors' mora_attack.py), shape (B, C):
    (1 - mix) * o / gap(o) + mix * sum_i w_i c_i z'_i / (sum_i w_i c_i + 1e-8).

    o is the mixture's log-mean-softmax and gap its top-1 minus top-2 value; z'_i are member i's
    logits divided by max_i gap(z_i) / 10 where that exceeds 10, else by 1 (mora_attack.py's
    get_sub_max_scale); c_i is 1 while member i (rescaled) still classifies y, so the weight goes to
    the members not yet fooled; w_i = p_i(r) (p_i(y) / P(y) + (1 - p_i(r)) / P(r)) with p_i member i's
    softmax, P the mean softmax of the rescaled members and r P's strongest class other than y
    (get_probablity_weight). mix = 0.9 and the weights' detachment are the authors' defaults.
    """
    output = mixture_log_probs(member_logits)
    with torch.no_grad():
        largest_gap = _top2_gap(member_logits).amax(dim=0)  # (B,)
        scale = torch.where(largest_gap > 10.0, largest_gap / 10.0, torch.ones_like(largest_gap))
    scaled = member_logits / scale[None, :, None]
    with torch.no_grad():
        probs = member_logits.softmax(dim=-1)  # (M, B, C)
        mean_scaled = scaled.softmax(dim=-1).mean(dim=0)  # (B, C)
        rival = mean_scaled.scatter(1, y[:, None], float("-inf")).argmax(dim=1)  # (B,)
        p_r = probs.gather(2, rival[None, :, None].expand(len(probs), -1, 1)).squeeze(2)
        p_y = probs.gather(2, y[None, :, None].expand(len(probs), -1, 1)).squeeze(2)
        big_p_y = mean_scaled.gather(1, y[:, None]).squeeze(1)
        big_p_r = mean_scaled.gather(1, rival[:, None]).squeeze(1)
        weight = p_r * (p_y / big_p_y + (1 - p_r) / big_p_r)  # (M, B)
        weight = weight * (scaled.argmax(dim=-1) == y[None]).to(weight.dtype)
    members = (weight[:, :, None] * scaled).sum(dim=0) / (weight.sum(dim=0)[:, None] + 1e-8)
    gap = _top2_gap(output).detach().clamp(min=1e-12)
    return (1 - mix) * output / gap[:, None] + mix * members


def is_ensemble(model: nn.Module) -> bool:
    """Whether the ensemble objectives can read `model`'s members' logits (a phalanx Mixture does)."""
    return callable(getattr(model, "member_logits", None))


def _member_logits(model: nn.Module, x: torch.Tensor, ensemble: Ensemble) -> torch.Tensor:
    if not is_ensemble(model):
        raise UsageError(f"the ensemble objective {ensemble.value!r} needs an ensemble whose members' logits it can "
                         f"read (a phalanx Mixture); got {type(model).__name__}; use ensemble='output' for one model")
    return model.member_logits(x)


def objective_and_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Loss, targeted: bool,
                         ensemble: Ensemble = Ensemble.OUTPUT) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-example objective the attacker ascends at `x`, and the model's own output there
    (on which success is judged). Differentiable in `x`."""
    if ensemble is Ensemble.OUTPUT:
        logits = model(x)
        return attack_objective(logits, y, loss=loss, targeted=targeted), logits
    member_logits = _member_logits(model, x, ensemble)
    output = mixture_log_probs(member_logits)
    if ensemble is Ensemble.MEAN_LOGITS:
        value = attack_objective(member_logits.mean(dim=0), y, loss=loss, targeted=targeted)
    elif ensemble is Ensemble.MEMBER_SUM:
        value = sum(attack_objective(z, y, loss=loss, targeted=targeted) for z in member_logits)
    else:
        value = attack_objective(mora_logits(member_logits, y), y, loss=loss, targeted=targeted)
    return value, output


# (model, x, y) -> the value the attacker ascends at x, one per example (B,), differentiable in x
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def loss_objective(loss: Loss = Loss.CE, *, targeted: bool = False,
                   ensemble: Ensemble = Ensemble.OUTPUT) -> Objective:
    """The `Objective` of `objective_and_logits` with these settings: the loss of the model's
    output (or of another function of an ensemble's members), negated when `targeted`."""
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return objective_and_logits(model, x, y, loss=loss, targeted=targeted, ensemble=ensemble)[0]
    return objective


def objective_gradient(objective: Objective, model: nn.Module, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """The gradient of the summed `objective` with respect to the input `x` only, shaped like x.

    Works inside `torch.no_grad()` callers; call it within `attack_mode(model)` so that
    backward computes no parameter gradients.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model, x, y).sum(), x)
    return grad


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: Loss, targeted: bool,
                   ensemble: Ensemble = Ensemble.OUTPUT) -> torch.Tensor:
    """`objective_gradient` of `loss_objective(loss, targeted=targeted, ensemble=ensemble)`."""
    return objective_gradient(loss_objective(loss, targeted=targeted, ensemble=ensemble), model, x, y)
