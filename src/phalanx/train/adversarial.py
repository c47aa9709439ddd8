"""Adversarial training: every member on its own adversarial examples (one member = one model).

- `mode: pgd`: Madry et al. (2018), min_theta E max_{||delta||_inf <= eps} CE(f(x + delta), y),
  the inner max by PGD from a random start; their CIFAR-10 setting (eps 8/255, step 2/255,
  7 steps, random start) is the default.
- `mode: fgsm-rs`: Wong, Rice & Kolter (2020), "Fast is better than free", Algorithm 3:
  delta ~ U(-eps, eps), one FGSM step of alpha = 1.25 eps from x + delta, clipped to the eps
  ball and [0, 1].

Each member is attacked (`attacks.pgd`, `attacks.fgsm_rs`) in eval mode with frozen parameters,
as every phalanx attack, and then trained on the adversarial batch only (Madry et al.'s objective).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks import fgsm_rs, pgd
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod


@dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial training's parameters (Linf threat model).

    - `mode` "pgd" (Madry et al. 2018) or "fgsm-rs" (Wong et al. 2020).
    - `eps` 8/255: Madry et al.'s and Wong et al.'s CIFAR-10 radius.
    - `alpha`: step size; null = the mode's default, 2/255 for pgd (Madry et al.'s CIFAR-10
      step) and 1.25 * eps for fgsm-rs (Wong et al., section 4: alpha = 1.25 eps).
    - `steps` 7: PGD iterations (Madry et al.'s CIFAR-10 training attack); ignored by fgsm-rs.
    - `random_start` True: PGD starts uniformly in the ball (Madry et al.); fgsm-rs always does.
    """

    mode: Literal["pgd", "fgsm-rs"] = "pgd"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 7
    random_start: bool = True

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 or null (the mode's default), got {self.alpha}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")

    def step_size(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 2 / 255 if self.mode == "pgd" else 1.25 * self.eps


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig,
                         generator: torch.Generator | None) -> torch.Tensor:
    """The training attack of `cfg` on `model` itself."""
    if cfg.mode == "fgsm-rs":
        return fgsm_rs(model, x, y, eps=cfg.eps, alpha=cfg.step_size(), generator=generator)
    return pgd(model, x, y, eps=cfg.eps, alpha=cfg.step_size(), steps=cfg.steps, random_start=cfg.random_start,
               generator=generator)


class Adversarial(TrainingMethod):
    """Adversarial training (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: AdversarialConfig) -> None:
        self.cfg = cfg


    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        losses = [F.cross_entropy(m(adversarial_examples(m, batch.x, batch.y, self.cfg, rng)), batch.y)
                  for m in members]
        return StepOutput(torch.stack(losses).sum(), torch.stack(losses).detach())
