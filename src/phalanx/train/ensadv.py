"""Ensemble adversarial training (Tramèr et al. 2018), as the GAL paper's T_Ens and T_Ens+Div (section 4.2).

The members train on the clean batch and on FGSM examples crafted on *static* pre-trained models
(other runs' members, frozen), never on themselves, so that the examples are transfer examples:

    loss_i = 0.5 * CE(f_i(x), y) + 0.5 * CE(f_i(x_adv), y)     (Tramèr et al.'s tf_utils.tf_train)
    x_adv  = clip_[0,1](x + eps_b * sign(grad_x CE(s(x), y_s)))  for one static model s per batch

Choices, each with its source:
- the static model of a batch: drawn uniformly at random (Tramèr et al.'s tf_train draws the
  source of every batch with np.random.randint), or `round-robin` (their ICLR paper's wording,
  "rotate the source"). Tramèr et al. also draw the trained model itself; the GAL paper uses
  static models only ("adversarial examples generated from a static pre-trained model"), as here.
- eps per example: the GAL paper draws it from a "truncated normal N(0, sigma = eps/2)" as
  suggested by Kurakin et al. (2016, section 4.1: "a truncated normal distribution defined in
  the interval [0, 16] with underlying normal distribution N(0, 8)"), i.e. the absolute value of
  N(0, (eps/2)^2) truncated at 2 sigma, so eps_b lies in [0, eps]. `eps_distribution: fixed`
  gives every example eps (Tramèr et al.'s code).
- the FGSM label: the static model's prediction (Tramèr et al.'s loss='training', against label
  leaking, Kurakin et al. 2016 section 4.2) or the true label (`label: true`).

`ensadv+gal` (T_Ens+Div) adds the GAL term: GAL paper eq. 9 on the same data (clean + FGSM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks import fgsm_per_example
from phalanx.data.batching import truncated_normal
from phalanx.errors import UsageError
from phalanx.models import Classifier
from phalanx.runs import frozen, load_frozen_members
from phalanx.train.api import Batch, StepOutput, TrainingMethod
from phalanx.train.gal import add_truncated_noise, gal_objective


@dataclass(frozen=True)
class EnsAdvConfig:
    """Ensemble adversarial training's parameters.

    - `static_runs`: run directories whose members (all of them, latest checkpoint) are the
      static models; required.
    - `eps` 0.09: the largest FGSM radius (the GAL paper's large CIFAR-10 eps; 0.3 for MNIST).
    - `eps_distribution` "truncated-normal" (GAL paper section 4.2 / Kurakin et al.) or "fixed".
    - `source` "random" (Tramèr et al.'s code) or "round-robin".
    - `label` "predicted" (Tramèr et al.'s code) or "true".
    """

    static_runs: tuple[str, ...] = ()
    eps: float = 0.09
    eps_distribution: Literal["truncated-normal", "fixed"] = "truncated-normal"
    source: Literal["random", "round-robin"] = "random"
    label: Literal["predicted", "true"] = "predicted"

    def __post_init__(self) -> None:
        if not self.static_runs:
            raise ValueError("static_runs must list at least one run directory (the static models)")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class EnsAdvGalConfig(EnsAdvConfig):
    """T_Ens+Div (GAL paper section 4.2): EnsAdv's data plus lambda * GAL (eq. 9, lambda 0.5).

    `noise_eps` 0 by default: the paper does not say whether T_Ens+Div also saw the noisy copy.
    """

    gal_lambda: float = 0.5
    noise_eps: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gal_lambda >= 0:
            raise ValueError(f"gal_lambda must be >= 0, got {self.gal_lambda}")
        if not self.noise_eps >= 0:
            raise ValueError(f"noise_eps must be >= 0, got {self.noise_eps}")


def draw_eps(n: int, *, eps: float, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """One FGSM radius per example, in [0, eps]: |N(0, (eps/2)^2)| truncated at eps, or eps itself."""
    if distribution == "fixed":
        return torch.full((n,), eps)
    return truncated_normal((n,), std=eps / 2, generator=generator).abs()


class EnsAdv(TrainingMethod):
    """Ensemble adversarial training (a `phalanx.train.api.TrainingMethod`).

    `static_models` replaces loading `cfg.static_runs` (for tests and library use).
    """


    def __init__(self, cfg: EnsAdvConfig, static_models: Sequence[nn.Module] | None = None) -> None:
        self.cfg = cfg
        self._static = None if static_models is None else [frozen(m) for m in static_models]
        self._turn = 0

    def static_models(self, device: torch.device) -> list[nn.Module]:
        """The static models on `device`, loaded from `static_runs` at the first call."""
        if self._static is None:
            self._static = [m for run in self.cfg.static_runs for m in load_frozen_members(run)]
        self._static = [m.to(device) for m in self._static]
        return self._static


    def pick(self, count: int, rng: torch.Generator) -> int:
        if self.cfg.source == "round-robin":
            k, self._turn = self._turn % count, self._turn + 1
            return k
        return int(torch.randint(count, (1,), generator=rng, device=rng.device).item())

    def adversarial_batch(self, batch: Batch, rng: torch.Generator) -> tuple[torch.Tensor, int]:
        """FGSM examples of the batch crafted on one static model; returns them and its index."""
        static = self.static_models(batch.x.device)
        k = self.pick(len(static), rng)
        model = static[k]
        if self.cfg.label == "predicted":
            with torch.no_grad():
                labels = model(batch.x).argmax(dim=1)
        else:
            labels = batch.y
        eps = draw_eps(len(batch.y), eps=self.cfg.eps, distribution=self.cfg.eps_distribution, generator=rng)
        return fgsm_per_example(model, batch.x, labels, eps=eps), k

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        x_adv, k = self.adversarial_batch(batch, rng)
        x, y = torch.cat([batch.x, x_adv]), torch.cat([batch.y, batch.y])
        if isinstance(self.cfg, EnsAdvGalConfig):
            if len(members) < 2:
                raise UsageError(f"ensadv+gal needs at least 2 members, got {len(members)}")
            if self.cfg.noise_eps > 0:
                noisy = add_truncated_noise(batch.x, eps=self.cfg.noise_eps, generator=rng)
                x, y = torch.cat([x, noisy]), torch.cat([y, batch.y])
            out = gal_objective(members, x, y, self.cfg.gal_lambda)
            out.extras["static_model"] = float(k)
            return out
        # the mean CE over clean + adversarial halves = 0.5 * (CE_clean + CE_adv), Tramèr et al.
        losses = [F.cross_entropy(m(x), y) for m in members]
        extras = {"static_model": float(k)}
        return StepOutput(torch.stack(losses).sum(), torch.stack(losses).detach(), extras)
