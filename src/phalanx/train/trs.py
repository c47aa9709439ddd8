"""TRS: Transferability Reduced Smooth ensembles (Yang et al., NeurIPS 2021): members whose input
gradients point in different directions and are small around each training point.

With g_i(x) = grad_x CE(f_i(x), y) per example, N members and a batch of B examples:

    Loss = sum_i CE_i(x)
         + lambda_a * mean_{i<j} mean_b |cos(g_i(x_b), g_j(x_b))|                       (similarity)
         + lambda_b * mean_i mean_b (2 / B_s^2) * ||g_i(x~_b)||_2^2                      (smoothness)

x~ keeps the first floor(B/2) examples clean and moves the others by `pgd_steps` signed steps of
delta/3, from a uniform start in the Linf delta ball, that ascend sum_i ||g_i||^2 (a worst case
of the smoothness within the ball), projected into the ball and [0, 1]. delta grows linearly
over the epochs from `init_delta` to `final_delta`. All input gradients are taken with
create_graph=True, so both terms reach every member's parameters (double back-propagation).

Sources. Everything follows the authors' code (AI-secure/Transferability-Reduced-Smooth-Ensemble,
commit 1d246dd): train/Empirical/trainer.py (TRS_Trainer, PGD), utils/Empirical/utils_ensemble.py
(Cosine, Magnitude), train/Empirical/train_trs.py (arguments); and the maintainers' answer in
their issue #1: lambda_a = scale * coeff, lambda_b = scale * lamda, and for CIFAR-10 lambda_a 40,
lambda_b 2.5, delta 0.01 -> 0.03. Where the code differs from how the method is usually stated:
- CE is summed over members, not averaged (trainer.py: `loss_std += loss`);
- the similarity takes |cos| (utils_ensemble.Cosine) and uses the clean batch only (trainer.py
  l.91-95), the smoothness uses the half-clean, half-perturbed x~ only (l.97-112, --plus-adv);
- the smoothness is 2 x the *squared* norm of the gradient of the *batch-mean* CE
  (utils_ensemble.Magnitude), i.e. (2 / B^2) ||g_i||^2 per example: B_s = `smooth_batch` fixes
  their B = 128 so the term stays a per-example mean (the same for any batch the loss sees, and
  exact under torchrun; their last, smaller batch of an epoch used its own B);
- the perturbation ascends the smoothness itself, not the CE (trainer.py PGD, l.22-49).
One choice is phalanx's: the perturbation is searched with the members in eval mode and frozen
(`attacks.attack_mode`, as every phalanx training attack); the authors' PGD ran them in train
mode (BatchNorm statistics of the perturbed half, and running statistics updated by each step).
Under torchrun each shard perturbs its own second half from its own random start: the same
distribution as one process, not the same draws (as GAL's noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.attacks import max_gradient_norm
from phalanx.errors import UsageError
from phalanx.geometry import ce_input_gradients, pairwise_cosines
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod


def _finite_at_least_zero(name: str, value: float) -> None:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class TrsConfig:
    """TRS's parameters; defaults are the authors' CIFAR-10 setting.

    - `lambda_a` 40: weight of the similarity term (issue #1: lambda_a = scale * coeff = 40).
    - `lambda_b` 2.5: weight of the smoothness term (issue #1: lambda_b = scale * lamda = 2.5).
    - `init_delta` 0.01, `final_delta` 0.03: the Linf radius of the perturbation, at epoch 0 and
      at `delta_epochs` (issue #1: delta_0 = --init-eps 0.01, delta_M = --adv-eps 0.03); 0 for
      both = the smoothness on clean points only (the authors' "cos-l2" training, no --plus-adv).
    - `delta_epochs` 120: delta(e) = init + (final - init) * min(e, delta_epochs) / delta_epochs
      for the 0-based epoch e (trainer.py l.98, over train_trs.py's --epochs 120): set it to
      train.epochs for the authors' schedule (the last epoch then runs just below final_delta).
    - `pgd_steps` 6: steps of the perturbation (trainer.py PGD: `steps = 6`).
    - `smooth_batch` 128: B_s of the smoothness term (train_trs.py --batch 128; see the module doc).
    """

    lambda_a: float = 40.0
    lambda_b: float = 2.5
    init_delta: float = 0.01
    final_delta: float = 0.03
    delta_epochs: int = 120
    pgd_steps: int = 6
    smooth_batch: int = 128

    def __post_init__(self) -> None:
        for name in ("lambda_a", "lambda_b", "init_delta", "final_delta"):
            _finite_at_least_zero(name, getattr(self, name))
        for name in ("delta_epochs", "pgd_steps", "smooth_batch"):
            _positive_int(name, getattr(self, name))


def delta_at(epoch: int, cfg: TrsConfig) -> float:
    """The perturbation radius of a 0-based epoch: linear from init_delta; final_delta from delta_epochs."""
    progress = min(epoch, cfg.delta_epochs) / cfg.delta_epochs
    return cfg.init_delta + (cfg.final_delta - cfg.init_delta) * progress


def smoothness_points(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, delta: float,
                      steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """x~: the first floor(B/2) examples as they are, the rest moved by `attacks.max_gradient_norm`
    in the Linf delta ball (trainer.py l.97-102); x itself when delta is 0 (nothing is drawn)."""
    if delta == 0:
        return x
    clean = len(y) // 2
    moved = max_gradient_norm(members, x[clean:], y[clean:], eps=delta, steps=steps, generator=generator)
    return torch.cat([x[:clean].detach(), moved])


def smoothness(grads: Sequence[torch.Tensor], smooth_batch: int) -> torch.Tensor:
    """mean_i mean_b (2 / B_s^2) ||g_i,b||^2: the authors' Magnitude of the gradient of a B_s-batch
    mean CE (utils_ensemble.Magnitude: `sum(g**2, 1).mean() * 2`), averaged over members (trainer.py
    l.123: `smooth_loss /= 3` for their 3 members)."""
    per_member = torch.stack([g.flatten(1).pow(2).sum(1).mean() for g in grads])
    return per_member.mean() * (2 / smooth_batch ** 2)


class Trs(TrainingMethod):
    """TRS ensemble training (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: TrsConfig) -> None:
        self.cfg = cfg
        self._delta: float | None = None

    @staticmethod
    def check_members(members: Sequence[nn.Module]) -> None:
        if len(members) < 2:
            raise UsageError(f"TRS compares members' gradients: it needs at least 2 members, "
                             f"got {len(members)}")

    def start_epoch(self, epoch: int, members: Sequence[Classifier],
                    rng: torch.Generator) -> dict[str, object]:
        """Sets the epoch's perturbation radius (`delta_at`) and logs it."""
        self.check_members(members)
        self._delta = delta_at(epoch, self.cfg)
        return {"delta": self._delta}

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        if self._delta is None:
            raise RuntimeError("call start_epoch before loss: it sets the epoch's perturbation radius")
        self.check_members(members)
        cfg = self.cfg
        ce, grads = ce_input_gradients(members, batch.x, batch.y, create_graph=cfg.lambda_a > 0)
        total = torch.stack(ce).sum()  # trainer.py l.87: the members' CEs summed, not averaged
        # utils_ensemble.Cosine: |cos| averaged over examples; trainer.py l.95: the mean over pairs
        similarity = pairwise_cosines(grads).abs().mean()
        extras = {"similarity": similarity.detach()}
        if cfg.lambda_a > 0:
            total = total + cfg.lambda_a * similarity
        if cfg.lambda_b > 0:
            x_s = smoothness_points(members, batch.x, batch.y, delta=self._delta, steps=cfg.pgd_steps,
                                    generator=rng)
            _, grads_s = ce_input_gradients(members, x_s, batch.y, create_graph=True)
            smooth = smoothness(grads_s, cfg.smooth_batch)
            total = total + cfg.lambda_b * smooth
            extras["smoothness"] = smooth.detach()
        return StepOutput(total, torch.stack(ce).detach(), extras)
