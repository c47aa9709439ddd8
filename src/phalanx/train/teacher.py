"""The frozen teacher of the methods that learn from a trained model (RRM, KD), loaded in one place."""

from __future__ import annotations

import torch
from torch import nn

from phalanx.errors import UsageError
from phalanx.runs import load_frozen_members
from phalanx.train.api import TrainingMethod


class TeacherMixin(TrainingMethod):
    """Loads member `teacher_member` of `teacher_run` once, frozen, and keeps it on the batch's device."""

    def _init_teacher(self, run: str, member: int, teacher: nn.Module | None) -> None:
        self._teacher_spec = (run, member)
        self._teacher = teacher

    def teacher(self, device: torch.device) -> nn.Module:
        if self._teacher is None:
            run, member = self._teacher_spec
            members = load_frozen_members(run)
            if not 0 <= member < len(members):
                raise UsageError(f"teacher_member = {member} is not a member of {run} "
                                 f"(it has {len(members)}: 0..{len(members) - 1})")
            self._teacher = members[member]
        self._teacher = self._teacher.to(device)
        return self._teacher
