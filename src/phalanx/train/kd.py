"""Knowledge distillation from a teacher's logits (Hinton, Vinyals & Dean 2015), RRM's KD baseline.

    loss_i = alpha * T^2 * KL(softmax(t / T) || softmax(s_i / T)) + (1 - alpha) * CE(s_i, y)

The RRM authors compare against this (slides, "Adversarial Robustness Transfer": KD 83% / 3%);
their l_2/train_kdloss.py uses alpha = 1 and T = 30, our defaults. Two details differ from
their script, as Hinton et al.: the KL is averaged over examples (their nn.KLDivLoss() default
also divides by the number of classes), and the CE term uses the untempered logits (theirs
CE(s / T, y); with alpha = 1 the term is absent either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput
from phalanx.train.teacher import TeacherMixin


@dataclass(frozen=True)
class KdConfig:
    """- `teacher_run` (required), `teacher_member` 0; `temperature` 30 and `alpha` 1.0 (the RRM
    authors' train_kdloss.py defaults)."""

    teacher_run: str = ""
    teacher_member: int = 0
    temperature: float = 30.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not self.teacher_run:
            raise ValueError("teacher_run must name a run directory (the teacher)")
        if isinstance(self.teacher_member, bool) or self.teacher_member < 0:
            raise ValueError(f"teacher_member must be an integer >= 0, got {self.teacher_member!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al. 2015)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


class Kd(TeacherMixin):
    """Knowledge distillation (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: KdConfig, teacher: nn.Module | None = None) -> None:
        self.cfg = cfg
        self._init_teacher(cfg.teacher_run, cfg.teacher_member, teacher)


    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        with torch.no_grad():
            target = self.teacher(batch.x.device)(batch.x)
        a, t = self.cfg.alpha, self.cfg.temperature
        terms = []
        for m in members:
            logits = m(batch.x)
            term = a * distillation_loss(logits, target, temperature=t)
            if a < 1:
                term = term + (1 - a) * F.cross_entropy(logits, batch.y)
            terms.append(term)
        return StepOutput(torch.stack(terms).sum(), torch.stack(terms).detach())
