"""Independent training: each member minimizes its own cross-entropy on the same batch.

All members see the same batches (as the DVERGE authors' train_baseline.py); they differ by
their initialization seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod


@dataclass(frozen=True)
class BaselineConfig:
    """The baseline has no parameters of its own."""


class Baseline(TrainingMethod):

    def __init__(self, cfg: BaselineConfig) -> None:
        self.cfg = cfg


    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        losses = [F.cross_entropy(m(batch.x), batch.y) for m in members]
        return StepOutput(torch.stack(losses).sum(), torch.stack(losses).detach())
