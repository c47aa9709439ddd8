"""Attack suites: AutoAttack's `standard` sequence and the ensemble-adaptive objectives.

A robustness number must survive more than the attack it was tuned with. `autoattack` runs
APGD-CE, APGD-T, FAB-T and Square in that order, each on the points still robust (Croce & Hein
2020; the order and settings of the authors' autoattack.py, version 'standard'). `ensemble` runs
APGD on four objectives that do not pass through the mixture's average of softmaxes (the mean of
the members' logits with CE and with DLR, the sum of the members' CE, MORA's reweighting), each on
every point the mixture classifies correctly, so that each objective's strength can be compared.
Either way, an example counts as robust only if it survives every attack run on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from phalanx.attacks import ATTACKS, AttackName, AttackSpec, attack_in_batches
from phalanx.attacks.losses import is_ensemble
from phalanx.enums import coerce_enum
from phalanx.errors import UsageError
from phalanx.eval.measure import correct_mask, max_perturbation


class Suite(str, Enum):
    AUTOATTACK = "autoattack"
    ENSEMBLE = "ensemble"


SUITES: dict[tuple[Suite, str], tuple[AttackName, ...]] = {
    # autoattack.py, version 'standard': apgd-ce, apgd-t, fab-t, square, each on the points still robust
    (Suite.AUTOATTACK, "linf"): (AttackName.APGD_CE, AttackName.APGD_T, AttackName.FAB_T, AttackName.SQUARE),
    (Suite.AUTOATTACK, "l2"): (AttackName.APGD_CE_L2, AttackName.APGD_T_L2, AttackName.FAB_T_L2,
                               AttackName.SQUARE_L2),
    (Suite.ENSEMBLE, "linf"): (AttackName.APGD_CE_MEAN_LOGITS, AttackName.APGD_DLR_MEAN_LOGITS,
                               AttackName.APGD_CE_MEMBER_SUM, AttackName.APGD_MORA),
    (Suite.ENSEMBLE, "l2"): (AttackName.APGD_CE_MEAN_LOGITS_L2, AttackName.APGD_DLR_MEAN_LOGITS_L2,
                             AttackName.APGD_CE_MEMBER_SUM_L2, AttackName.APGD_MORA_L2),
}

CASCADE = {Suite.AUTOATTACK: True, Suite.ENSEMBLE: False}
"""Whether each attack runs only on the points the previous ones left robust (AutoAttack), or on
every correctly classified point (the ensemble suite, so that objectives can be compared)."""


def coerce_suite(name: Suite | str) -> Suite:
    return coerce_enum(Suite, name, "suite")


@dataclass(frozen=True)
class StageResult:
    """One attack of a suite: which points it left robust (over all the suite's examples)."""

    spec: AttackSpec
    robust: torch.Tensor  # bool (n,): correct clean and not fooled by this attack (or, cascaded, by any so far)
    attacked: int  # how many points it was run on
    wall_time_s: float
    max_perturbation: float


def suite_specs(suite: Suite | str, eps: float, norm: str = "linf") -> list[AttackSpec]:
    """The attacks of `suite` at `eps`, each with its registry defaults (AutoAttack's for its four)."""
    suite = coerce_suite(suite)
    if (suite, norm) not in SUITES:
        raise UsageError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return [AttackSpec(name, eps) for name in SUITES[(suite, norm)]]


def applies_to(suite: Suite | str, model: nn.Module) -> bool:
    """The ensemble suite needs the members' logits; a single model gets only AutoAttack."""
    return coerce_suite(suite) is not Suite.ENSEMBLE or is_ensemble(model)


def run_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: Suite | str, *, eps: float,
              norm: str = "linf", clean_correct: torch.Tensor, batch_size: int = 500, seed: int = 0,
              progress: str | None = None) -> list[StageResult]:
    """Run every attack of `suite` on `model`, starting from the points in `clean_correct`.

    Returns one StageResult per attack, in order. Every attack gets its own generator seeded with
    `seed`, so a stage is reproducible on its own. Call `robust_after` for the suite's verdict.
    """
    suite = coerce_suite(suite)
    robust = clean_correct.clone()
    out: list[StageResult] = []
    for spec in suite_specs(suite, eps, norm):
        if ATTACKS[spec.name].ensemble_only and not applies_to(suite, model):
            raise UsageError(f"the {suite.value} suite needs an ensemble (a phalanx Mixture), got "
                             f"{type(model).__name__}")
        todo = robust if CASCADE[suite] else clean_correct
        idx = todo.nonzero().squeeze(1)
        started = time.perf_counter()
        stage_robust = todo.clone()
        max_pert = 0.0
        if len(idx):
            gen = torch.Generator(device=x.device).manual_seed(seed)
            x_adv = attack_in_batches(spec, model, x[idx], y[idx], batch_size, generator=gen,
                                      progress=f"{progress} {spec.name.value}" if progress else None)
            stage_robust[idx] = correct_mask(model, x_adv, y[idx], batch_size)
            max_pert = max_perturbation(x_adv, x[idx], norm)
        out.append(StageResult(spec, stage_robust, len(idx), time.perf_counter() - started, max_pert))
        if CASCADE[suite]:
            robust = stage_robust
        else:
            robust &= stage_robust
    return out


def robust_after(stages: Sequence[StageResult], clean_correct: torch.Tensor) -> torch.Tensor:
    """Per example: correct clean and robust to every stage (the per-example worst case)."""
    robust = clean_correct.clone()
    for stage in stages:
        robust &= stage.robust
    return robust


def stage_record(stage: StageResult) -> dict[str, Any]:
    """A stage's parameters as used, for the `stages` list of a suite's record."""
    n = len(stage.robust)
    return {"attack": stage.spec.name.value, "params": stage.spec.resolved_params(), "attacked": stage.attacked,
            "robust_after": float(stage.robust.float().mean()) if n else 0.0,
            "wall_time_s": stage.wall_time_s, "max_perturbation": stage.max_perturbation}
