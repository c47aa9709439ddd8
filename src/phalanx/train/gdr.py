"""GDR regularization (Adam & Speciel 2020, arXiv:2005.05750): members trained so that few input
directions raise all their losses at once.

    Loss = (1/N) sum_i CE_i + lambda * mean_batch GDR(grad_x CE_1, ..., grad_x CE_N)

GDR is the first-order fraction of directions that increase every member's loss (derived in
`phalanx.geometry`, which the evaluation's `phalanx.eval.gdr` also uses), a function of the
pairwise cosines of the input gradients; it is exact and differentiable for N <= 3 members and,
for N >= 4, replaced by the mean of the 3-member GDRs over all triples (`smooth_gdr`). Unlike
GAL's log-sum-exp of cosines, it does not push every pair towards the same angle (the blog's three-model example). The input gradients are
taken with create_graph=True (double back-propagation), as for GAL. The preprint's exact
regularizer was not available to us: this follows the blog's definition; lambda has no
published default and 0.5 (GAL's) is our choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from phalanx.geometry import ce_input_gradients, smooth_gdr
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod
from phalanx.train.gal import Gal, GalConfig


@dataclass(frozen=True)
class GdrConfig:
    """- `gdr_lambda` 0.5 (our choice); `noise_eps` 0 (no noisy copy; the GAL paper's option);
    `warn_relu` True (ReLU's sparse input gradients stall any gradient-angle regularizer)."""

    gdr_lambda: float = 0.5
    noise_eps: float = 0.0
    warn_relu: bool = True

    def __post_init__(self) -> None:
        if not self.gdr_lambda >= 0:
            raise ValueError(f"gdr_lambda must be >= 0, got {self.gdr_lambda}")
        if not self.noise_eps >= 0:
            raise ValueError(f"noise_eps must be >= 0, got {self.noise_eps}")


class Gdr(TrainingMethod):
    """GDR-regularized ensemble training (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: GdrConfig) -> None:
        self.cfg = cfg
        # the data handling and the member checks are GAL's
        self._gal = Gal(GalConfig(gal_lambda=cfg.gdr_lambda, noise_eps=cfg.noise_eps, warn_relu=cfg.warn_relu))

    def start_epoch(self, epoch: int, members: Sequence[Classifier], rng: torch.Generator) -> dict[str, object]:
        self._gal.check_members(members)
        return {}

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        self._gal.check_members(members)
        x, y = self._gal.inputs(batch, rng)
        losses, grads = ce_input_gradients(members, x, y, create_graph=self.cfg.gdr_lambda > 0)
        gdr = smooth_gdr(grads).mean()
        ce = torch.stack(losses).mean()
        total = ce + self.cfg.gdr_lambda * gdr if self.cfg.gdr_lambda > 0 else ce
        return StepOutput(total, torch.stack(losses).detach(), {"gdr": gdr.detach()})
