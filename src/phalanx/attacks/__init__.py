"""Adversarial attacks as functions `attack(model, x, y, **params) -> x_adv` on one template (core.py)."""

from phalanx.attacks.apgd import apgd, apgd_checkpoints, apgd_t, dlr_objective
from phalanx.attacks.core import (
    Ensemble,
    Loss,
    Norm,
    attack_mode,
    attack_objective,
    coerce_ensemble,
    coerce_loss,
    coerce_norm,
    input_gradient,
    iterate,
    objective_and_logits,
    project,
    sample_in_ball,
    steepest_step,
    targeted_dlr,
)
from phalanx.attacks.cw import cw_objective, pgd_cw
from phalanx.attacks.fab import fab_t
from phalanx.attacks.fgsm import fgsm
from phalanx.attacks.fgsm_family import ifgsm, l1_momentum, mifgsm, rfgsm
from phalanx.attacks.pgd import madry_step, pgd
from phalanx.attacks.square import square
from phalanx.attacks.transfer_attacks import input_diversity, mdi2fgsm, sgm, skip_gradient, transfer_step
from phalanx.attacks.registry import (
    ATTACKS,
    ONE_STEP_VERSION,
    AttackEntry,
    AttackName,
    AttackSpec,
    attack_in_batches,
    coerce_attack_name,
    run_attack,
)

__all__ = [
    "ATTACKS",
    "ONE_STEP_VERSION",
    "AttackEntry",
    "AttackName",
    "AttackSpec",
    "Ensemble",
    "Loss",
    "Norm",
    "apgd",
    "apgd_checkpoints",
    "apgd_t",
    "attack_in_batches",
    "attack_mode",
    "attack_objective",
    "coerce_attack_name",
    "coerce_ensemble",
    "coerce_loss",
    "coerce_norm",
    "cw_objective",
    "dlr_objective",
    "fab_t",
    "fgsm",
    "ifgsm",
    "input_diversity",
    "input_gradient",
    "iterate",
    "l1_momentum",
    "madry_step",
    "mdi2fgsm",
    "mifgsm",
    "objective_and_logits",
    "pgd",
    "pgd_cw",
    "project",
    "rfgsm",
    "run_attack",
    "sample_in_ball",
    "sgm",
    "skip_gradient",
    "square",
    "steepest_step",
    "targeted_dlr",
    "transfer_step",
]
