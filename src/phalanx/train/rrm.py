"""Robust Representation Matching (Vaishnavi, Eykholt & Rahmati 2022; RRM slides).

Each member (a student, any architecture) matches the penultimate features of an adversarially
trained teacher, a member of another run, while learning the labels:

    loss_i = lambda * CE(S_i(x), y) + d(P_i(g_{S_i}(x)), g_T(x))          (slides: min lambda L_C + L_R)

g is the penultimate layer (`layer_names[-2]`, after its activation, as the authors'
`with_latent` output); d is the cosine distance 1 - cos (slides: "the distance, e.g., cosine
similarity"), or `l2`, ||s - t|| / ||t|| (the authors' l_2/train_rrm.py --feat-loss l2).
The authors' scripts add `feat_weight * mean(CosineSimilarity(s, t))` to the loss (l_2 and
l_inf/train_rrm.py) and run with `--feat-weight -1`, so they maximize the similarity: the same
objective as our 1 - cos with weight 1, up to a constant (the slides' L_R).

P_i is the identity when the feature sizes agree, else a learned linear map from the student's
size to the teacher's (the authors' ResNet adds a trained `added_linear` to reach their common
512-d penultimate layer). Its parameters are the method's, not the members': the loop must add
`extra_parameters(members)` to the optimizer before training and save/restore `state_dict()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput
from phalanx.train.teacher import TeacherMixin


def penultimate(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The penultimate layer's output (after its activation), flattened: (batch, features)."""
    return model.penultimate(x)


def representation_distance(student: torch.Tensor, teacher: torch.Tensor,
                            kind: Literal["cosine", "l2"] = "cosine") -> torch.Tensor:
    """RRM's L_R per example: 1 - cos(s, t), or ||s - t|| / ||t||; shape (batch,)."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6)
    return (student - teacher).norm(dim=1) / teacher.norm(dim=1).clamp(min=1e-12)


@dataclass(frozen=True)
class RrmConfig:
    """RRM's parameters; defaults from the commands of the authors' l_infty/README.md.

    - `teacher_run` (required): an adversarially trained run; `teacher_member` 0: which member.
    - `xent_weight` 0.005: the slides' lambda. The authors' CIFAR-10 L-inf command passes
      `--xent-weight 0.005 --feat-weight -1` (their L2 one 0.001), i.e. 0.005 CE - cos, which
      equals 0.005 CE + (1 - cos) up to a constant: the representation term dominates. (Their
      argparse defaults are --xent-weight 0.005 for l_inf, 0.00005 for l_2, and --feat-weight -1.)
      With 1.0 our Conv student kept 0.8% PGD accuracy from a 27.5% teacher (CE dominated).
    - `feat_weight` 1.0: the weight of L_R = 1 - cos (the authors' -1 on +cos).
    - `feat_loss` "cosine" (authors' default) or "l2".
    """

    teacher_run: str = ""
    teacher_member: int = 0
    xent_weight: float = 0.005
    feat_weight: float = 1.0
    feat_loss: Literal["cosine", "l2"] = "cosine"

    def __post_init__(self) -> None:
        if not self.teacher_run:
            raise ValueError("teacher_run must name a run directory (the adversarially trained teacher)")
        if isinstance(self.teacher_member, bool) or self.teacher_member < 0:
            raise ValueError(f"teacher_member must be an integer >= 0, got {self.teacher_member!r}")
        if not self.xent_weight >= 0 or not self.feat_weight >= 0:
            raise ValueError(f"xent_weight and feat_weight must be >= 0, "
                             f"got {self.xent_weight} and {self.feat_weight}")


class Rrm(TeacherMixin):
    """RRM (a `phalanx.train.api.TrainingMethod`), plus `extra_parameters`/`state_dict`.

    `teacher` replaces loading `cfg.teacher_run` (tests and library use).
    """


    def __init__(self, cfg: RrmConfig, teacher: nn.Module | None = None) -> None:
        self.cfg = cfg
        self._init_teacher(cfg.teacher_run, cfg.teacher_member, teacher)
        self.projections: nn.ModuleList | None = None

    def extra_parameters(self, members: Sequence[Classifier]) -> list[nn.Parameter]:
        """Build the projections for `members` (on their device) and return their parameters.

        Call once, after the members are on their device and before the optimizer is made;
        the optimizer must include these parameters (e.g. as one more parameter group).
        Members whose feature size equals the teacher's get the identity (no parameters).
        """
        device = next(members[0].parameters()).device
        spec = members[0].spec
        probe = torch.zeros(1, spec.channels, spec.size, spec.size, device=device)
        teacher = self.teacher(device)
        with torch.no_grad():
            t_dim = penultimate(teacher, probe).shape[1]
            dims = [penultimate(m, probe).shape[1] for m in members]
        self.projections = nn.ModuleList(
            nn.Identity() if d == t_dim else nn.Linear(d, t_dim).to(device) for d in dims)
        return list(self.projections.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The projections' tensors, for the run's checkpoint (empty when all are identities)."""
        return {} if self.projections is None else self.projections.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.projections is None:
            raise RuntimeError("call extra_parameters(members) before load_state_dict: it builds the projections")
        self.projections.load_state_dict(state)


    def _projection(self, i: int, s_dim: int, t_dim: int) -> nn.Module:
        if self.projections is not None:
            return self.projections[i]
        if s_dim != t_dim:
            raise RuntimeError(f"member {i}'s penultimate features have {s_dim} values and the teacher's "
                               f"{t_dim}: RRM needs a trained projection; call extra_parameters(members) and "
                               "add its parameters to the optimizer before training")
        return nn.Identity()

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        teacher = self.teacher(batch.x.device)
        with torch.no_grad():
            target = penultimate(teacher, batch.x)
        terms, feats = [], []
        for i, m in enumerate(members):
            g, logits = _penultimate_and_logits(m, batch.x)
            g = self._projection(i, g.flatten(1).shape[1], target.shape[1])(g.flatten(1))
            dist = representation_distance(g, target, self.cfg.feat_loss).mean()
            feats.append(dist.detach())
            terms.append(self.cfg.xent_weight * F.cross_entropy(logits, batch.y) + self.cfg.feat_weight * dist)
        extras = {"representation_loss": sum(feats) / len(feats)}
        return StepOutput(torch.stack(terms).sum(), torch.stack(terms).detach(), extras)


def _penultimate_and_logits(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate output and the logits, in one forward where the model is a chain of named
    stages (`StagedClassifier`: the last stage maps the activated penultimate output to the
    logits); otherwise a second forward of `x`."""
    from phalanx.models.conv import StagedClassifier

    if isinstance(model, StagedClassifier):
        g = model.features(x, model.layer_names[-2], pre_activation=False)
        return g, model.stages[model.layer_names[-1]](g)
    return model.penultimate(x), model(x)
