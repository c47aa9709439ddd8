"""Attacks by name: a plain dict of declarative entries, an `AttackSpec` to name one, and runners.

`AttackSpec` is the one description of an attack everywhere: in code, in a config's
`eval.attacks` (its mapping form, `AttackSpec.from_mapping`) and on the command line. What the
callers need to know about an attack (its norm, the loss it ascends, which step parameters it
takes and their defaults) is stated by its entry, so that none of them names an attack.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from phalanx.attacks.apgd import apgd, apgd_t
from phalanx.attacks.core import Loss, Norm, check_eps, coerce_loss
from phalanx.attacks.cw import pgd_cw
from phalanx.attacks.fab import fab_t
from phalanx.attacks.fgsm import fgsm
from phalanx.attacks.fgsm_family import ifgsm, mifgsm, rfgsm
from phalanx.attacks.pgd import madry_step, pgd
from phalanx.attacks.report_pgd import REPORT_ALPHA, REPORT_EPS, REPORT_STATED_STEPS, report_pgd
from phalanx.attacks.square import square
from phalanx.attacks.transfer_attacks import mdi2fgsm, sgm, transfer_step
from phalanx.config import check, read_fields
from phalanx.enums import coerce_enum
from phalanx.errors import UsageError


class AttackName(str, Enum):
    FGSM = "fgsm"
    PGD_LINF = "pgd-linf"
    PGD_L2 = "pgd-l2"
    R_FGSM = "r-fgsm"
    I_FGSM = "i-fgsm"
    MI_FGSM = "mi-fgsm"
    PGD_CW = "pgd-cw"
    APGD_CE = "apgd-ce"
    APGD_DLR = "apgd-dlr"
    APGD_T = "apgd-t"
    FAB_T = "fab-t"
    SQUARE = "square"
    I_FGSM_L2 = "i-fgsm-l2"
    MI_FGSM_L2 = "mi-fgsm-l2"
    APGD_CE_L2 = "apgd-ce-l2"
    APGD_DLR_L2 = "apgd-dlr-l2"
    APGD_T_L2 = "apgd-t-l2"
    FAB_T_L2 = "fab-t-l2"
    SQUARE_L2 = "square-l2"
    # ensemble-adaptive: APGD on an objective that does not pass through the average of softmaxes
    APGD_CE_MEAN_LOGITS = "apgd-ce-mean-logits"
    APGD_DLR_MEAN_LOGITS = "apgd-dlr-mean-logits"
    APGD_CE_MEMBER_SUM = "apgd-ce-member-sum"
    APGD_MORA = "apgd-mora"
    APGD_CE_MEAN_LOGITS_L2 = "apgd-ce-mean-logits-l2"
    APGD_DLR_MEAN_LOGITS_L2 = "apgd-dlr-mean-logits-l2"
    APGD_CE_MEMBER_SUM_L2 = "apgd-ce-member-sum-l2"
    APGD_MORA_L2 = "apgd-mora-l2"
    # the DVERGE report's own unprojected attacks (report_pgd.py): its protocol only, never a default
    PGD_LINF_REPORT = "pgd-linf-report"
    PGD_L2_REPORT = "pgd-l2-report"
    # the DVERGE authors' black-box transfer attacks on surrogate ensembles (transfer_attacks.py)
    M_DI2_FGSM = "m-di2-fgsm"
    SGM = "sgm"


def coerce_attack_name(name: AttackName | str) -> AttackName:
    return coerce_enum(AttackName, name, "attack")


# eps-dependent defaults: (eps, the other resolved parameters) -> value, filled in where a parameter is None
Derivation = Callable[[float, Mapping[str, Any]], Any]

# The parameters a config's `eval.attacks[]` entry (and the CLI's --alpha, --steps, --restarts) may
# set on an attack that takes them, with the type a config value must have; every other parameter
# keeps its entry's value.
STEP_PARAMETERS: Mapping[str, type] = MappingProxyType(
    {"alpha": float, "steps": int, "random_start": bool, "restarts": int})


@dataclass(frozen=True)
class AttackEntry:
    """An attack function and the keyword arguments it gets unless a spec overrides them.

    The function's own keyword defaults apply unless `defaults` replaces them; `fixed` arguments
    define the entry (e.g. the norm of "pgd-l2") and cannot be overridden; `derived` computes a
    parameter left None from eps (e.g. PGD's step 2.5 * eps / steps), so that the record of a run
    holds the number actually used. `loss` is the per-example loss the attack ascends when its
    function takes no `loss` argument (one that does takes it from `fixed`, `defaults` or the spec).
    """

    fn: Callable[..., torch.Tensor]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    derived: Mapping[str, Derivation] = field(default_factory=dict)
    ensemble_only: bool = False  # its objective needs a model with member_logits (a Mixture)
    loss: Loss = Loss.CE

    def tunable(self) -> frozenset[str]:
        """Names a spec may set: the function's keyword-only arguments, less eps, generator, `fixed`."""
        return frozenset(_keyword_defaults(self.fn)) - {"eps", "generator"} - set(self.fixed)

    def step_parameters(self) -> frozenset[str]:
        """The `STEP_PARAMETERS` it takes: what a config entry or a CLI step flag may set on it."""
        return self.tunable() & set(STEP_PARAMETERS)

    def resolve(self, eps: float, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every keyword argument the function gets for this eps except eps and generator."""
        own = {k: v for k, v in _keyword_defaults(self.fn).items() if k not in ("eps", "generator")}
        out = {**own, **self.defaults, **params, **self.fixed}
        for name, rule in self.derived.items():
            if out.get(name) is None:
                out[name] = rule(eps, out)
        return out


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _madry(eps: float, p: Mapping[str, Any]) -> float:
    return madry_step(eps, p["steps"])


def _half_eps(eps: float, p: Mapping[str, Any]) -> float:
    return eps / 2


def _transfer_step(eps: float, p: Mapping[str, Any]) -> float:
    return transfer_step(eps)


_MADRY = MappingProxyType({"alpha": _madry})


def _apgd(norm: Norm, **fixed: Any) -> AttackEntry:
    # APGD: Croce & Hein (2020)'s 100 iterations, momentum and rho 0.75, 1 restart (AutoAttack standard)
    return AttackEntry(apgd, fixed={"norm": norm, **fixed}, ensemble_only="ensemble" in fixed)


def _apgd_t(norm: Norm) -> AttackEntry:
    # APGD-T as AutoAttack's standard suite runs it: 9 target classes, 100 iterations, 1 restart
    # (autoattack.py), on the targeted DLR loss
    return AttackEntry(apgd_t, fixed={"norm": norm}, loss=Loss.DLR)


ATTACKS: dict[AttackName, AttackEntry] = {
    AttackName.FGSM: AttackEntry(fgsm, fixed={"norm": Norm.LINF}),
    # PGD: 10 steps of 2.5 * eps / steps with a random start (Madry et al. 2018); the DVERGE report's
    # fixed step 0.007 belongs to its own protocol (eval/protocols.py), not to a default
    AttackName.PGD_LINF: AttackEntry(pgd, fixed={"norm": Norm.LINF}, derived=_MADRY),
    AttackName.PGD_L2: AttackEntry(pgd, fixed={"norm": Norm.L2}, derived=_MADRY),
    # The GAL paper's evaluation (section 4.1): R-FGSM, I-FGSM and MI-FGSM with k = 10 steps of
    # eps / 10, mu = 1; PGD-CW with kappa = 50 and 30 iterations (step 2.5 * eps / steps: the paper
    # gives none). R-FGSM's random step alpha is eps / 2, Tramer et al.'s setting (see `rfgsm`).
    AttackName.R_FGSM: AttackEntry(rfgsm, fixed={"norm": Norm.LINF}, derived={"alpha": _half_eps}),
    AttackName.I_FGSM: AttackEntry(ifgsm, fixed={"norm": Norm.LINF}, defaults={"steps": 10}),
    AttackName.MI_FGSM: AttackEntry(mifgsm, fixed={"norm": Norm.LINF}, defaults={"steps": 10, "mu": 1.0}),
    AttackName.PGD_CW: AttackEntry(pgd_cw, fixed={"norm": Norm.LINF}, defaults={"steps": 30, "kappa": 50.0},
                                   derived=_MADRY, loss=Loss.CW),
    AttackName.APGD_CE: _apgd(Norm.LINF, loss="ce"),
    AttackName.APGD_DLR: _apgd(Norm.LINF, loss="dlr"),
    AttackName.APGD_T: _apgd_t(Norm.LINF),
    # FAB-T as AutoAttack's standard suite runs it: 9 target classes, 100 iterations, 1 restart
    # (autoattack.py); it steps to the linearised boundary of the logit margin z_t - z_y (the CW margin)
    AttackName.FAB_T: AttackEntry(fab_t, fixed={"norm": Norm.LINF}, loss=Loss.CW),
    AttackName.FAB_T_L2: AttackEntry(fab_t, fixed={"norm": Norm.L2}, loss=Loss.CW),
    # Square as AutoAttack's standard suite runs it: 5,000 queries, p_init 0.8, 1 restart, the margin
    # loss (autoattack.py)
    AttackName.SQUARE: AttackEntry(square, fixed={"norm": Norm.LINF}, loss=Loss.CW),
    AttackName.SQUARE_L2: AttackEntry(square, fixed={"norm": Norm.L2}, loss=Loss.CW),
    AttackName.I_FGSM_L2: AttackEntry(ifgsm, fixed={"norm": Norm.L2}, defaults={"steps": 10}),
    AttackName.MI_FGSM_L2: AttackEntry(mifgsm, fixed={"norm": Norm.L2}, defaults={"steps": 10, "mu": 1.0}),
    AttackName.APGD_CE_L2: _apgd(Norm.L2, loss="ce"),
    AttackName.APGD_DLR_L2: _apgd(Norm.L2, loss="dlr"),
    AttackName.APGD_T_L2: _apgd_t(Norm.L2),
    AttackName.APGD_CE_MEAN_LOGITS: _apgd(Norm.LINF, loss="ce", ensemble="mean-logits"),
    AttackName.APGD_DLR_MEAN_LOGITS: _apgd(Norm.LINF, loss="dlr", ensemble="mean-logits"),
    AttackName.APGD_CE_MEMBER_SUM: _apgd(Norm.LINF, loss="ce", ensemble="member-sum"),
    # MORA's reweighted combination with its default CE loss (the authors' mora_attack.py), driven by APGD
    AttackName.APGD_MORA: _apgd(Norm.LINF, loss="ce", ensemble="mora"),
    AttackName.APGD_CE_MEAN_LOGITS_L2: _apgd(Norm.L2, loss="ce", ensemble="mean-logits"),
    AttackName.APGD_DLR_MEAN_LOGITS_L2: _apgd(Norm.L2, loss="dlr", ensemble="mean-logits"),
    AttackName.APGD_CE_MEMBER_SUM_L2: _apgd(Norm.L2, loss="ce", ensemble="member-sum"),
    AttackName.APGD_MORA_L2: _apgd(Norm.L2, loss="ce", ensemble="mora"),
    AttackName.PGD_LINF_REPORT: AttackEntry(report_pgd, fixed={"norm": Norm.LINF}),
    AttackName.PGD_L2_REPORT: AttackEntry(report_pgd, fixed={"norm": Norm.L2}),
    # The DVERGE authors' transfer attacks (Yang et al. 2020, section 5); their crafting code is not public:
    # steps 100: their scripts/evaluation.sh:12 (--steps 100, the count in eval/eval_bbox.py:71's set names);
    # step eps / 5: assumed, their step in eval/eval_transferability.py:97 and eval/eval_wbox.py:118,163;
    # p 0.5: eval/eval_bbox.py:71 "mdi2_0.5" (their appendix A; Xie et al.'s too);
    # mu 1.0: their momentum Linf_PGD (distillation.py:32, mu=1), Xie et al.'s decay;
    # resize_rate 1.1: assumed, Xie et al.'s 299 -> [299, 330) is x1.10 (no CIFAR bound is published);
    # gamma 0.2: eval/eval_bbox.py:71 "sgm_0.2" (Wu et al.'s ResNet value);
    # SGM mu 0: assumed, the SGM authors' attack_sgm.py (--momentum 0.0, no random start); DVERGE's
    #   momentum set is their separate "mpgd".
    AttackName.M_DI2_FGSM: AttackEntry(mdi2fgsm, fixed={"norm": Norm.LINF},
                                       defaults={"steps": 100, "mu": 1.0, "p": 0.5, "resize_rate": 1.1},
                                       derived={"alpha": _transfer_step}),
    AttackName.SGM: AttackEntry(sgm, fixed={"norm": Norm.LINF},
                                defaults={"steps": 100, "gamma": 0.2, "mu": 0.0},
                                derived={"alpha": _transfer_step}),
}

ONE_STEP_VERSION: dict[AttackName, AttackName] = {
    AttackName.PGD_LINF: AttackName.FGSM, AttackName.I_FGSM: AttackName.FGSM, AttackName.MI_FGSM: AttackName.FGSM,
    AttackName.APGD_CE: AttackName.FGSM,
}
"""Iterative Linf CE attacks and the one-step attack they must never be weaker than (a sanity check)."""


# Written in the run configs of phalanx before attack parameters defaulted to "not given", for
# every attack: read as not given by an attack that does not take them.
_WRITTEN_BEFORE: Mapping[str, Any] = MappingProxyType({"random_start": True, "restarts": 1})


@dataclass(frozen=True)
class AttackSpec:
    """One attack to run: its registered name, its eps and the parameters that differ from the
    entry's defaults (one equal to a default that eps does not scale is the same attack as one not
    given, and is dropped). Validated on construction: the name, eps and the parameter names."""

    name: AttackName
    eps: float
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", coerce_attack_name(self.name))
        check_eps(self.eps)
        entry = ATTACKS[self.name]
        unknown = set(self.params) - entry.tunable()
        if unknown:
            raise UsageError(f"attack {self.name.value!r} takes no parameter(s) {sorted(unknown)}; "
                             f"allowed: {sorted(entry.tunable())}")
        own = entry.resolve(self.eps, {})
        kept = {k: v for k, v in self.params.items() if v is not None and (k in entry.derived or v != own[k])}
        object.__setattr__(self, "params", MappingProxyType(kept))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, path: str = "eval.attacks[]") -> AttackSpec:
        """The attack of a config's `eval.attacks[]` entry: {name, eps} and the step parameters the
        attack takes (`STEP_PARAMETERS`; null: its default). A key or value that is not allowed
        raises ConfigError naming it at `path`."""
        types = {"name": str, "eps": float, **{k: t | None for k, t in STEP_PARAMETERS.items()}}
        values = read_fields(data, types, path)
        check({"name", "eps"} <= set(values), path, data, "a mapping with a name and an eps")
        name, eps = values.pop("name"), values.pop("eps")
        names = [a.value for a in AttackName]
        check(name in names, f"{path}.name", name, f"one of {names}")
        entry = ATTACKS[AttackName(name)]
        takes = entry.step_parameters()
        params = {k: v for k, v in values.items()
                  if v is not None and (k in takes or v != _WRITTEN_BEFORE.get(k))}
        linf = entry.fixed.get("norm") != Norm.L2
        check(0 <= eps and (eps <= 1 or not linf), f"{path}.eps", eps,
              "a number in [0, 1] (an Linf budget in pixels)" if linf else "a finite number >= 0")
        check(set(params) <= takes, f"{path} ({name})", sorted(set(params) - takes),
              f"only parameters {name} takes: {sorted(takes)}")
        check(params.get("alpha", 1.0) > 0, f"{path}.alpha", params.get("alpha"), "a finite number > 0")
        check(params.get("steps", 1) >= 1, f"{path}.steps", params.get("steps"), "an integer >= 1")
        check(params.get("restarts", 1) >= 1, f"{path}.restarts", params.get("restarts"), "an integer >= 1")
        return cls(AttackName(name), eps, params)

    def to_mapping(self) -> dict[str, Any]:
        """The mapping `from_mapping` reads (a run's config.yaml): name, eps and every step parameter
        (null: the attack's default), then any other parameter set."""
        steps = {k: self.params.get(k) for k in STEP_PARAMETERS}
        rest = {k: v.value if isinstance(v, Enum) else v for k, v in self.params.items() if k not in steps}
        return {"name": self.name.value, "eps": self.eps, **steps, **rest}

    def budget(self) -> float:
        """The norm bound its perturbations must respect: the attack's own (`core.attack`'s `budget`),
        eps for all but the report's unprojected attacks (their reach)."""
        entry = ATTACKS[self.name]
        return float(entry.fn.budget(self.eps, entry.resolve(self.eps, self.params)))

    def resolved_params(self) -> dict[str, Any]:
        """Every keyword argument the attack function gets except eps and generator, with the
        eps-dependent defaults computed: the parameters actually used (for records)."""
        params = ATTACKS[self.name].resolve(self.eps, self.params)
        return {k: v.value if isinstance(v, Enum) else v for k, v in params.items()}

    def loss(self) -> Loss:
        """The per-example loss the attack ascends: its `loss` argument where its function takes
        one, else its entry's `loss`."""
        return coerce_loss(self.resolved_params().get("loss", ATTACKS[self.name].loss))


def report_attacks(*, scripted: bool) -> tuple[AttackSpec, ...]:
    """The DVERGE report's evaluation (section 3.1): FGSM, PGD-Linf and PGD-L2 at eps 0.03. The PGDs
    as its text states them (projected, step 0.007, 10 steps: the default `eval.attacks`), or with
    `scripted` as its evaluation script runs them (`report_pgd`: unprojected, 5 steps; the
    dverge-report protocol)."""
    if scripted:
        pgds = [(AttackName.PGD_LINF_REPORT, {}), (AttackName.PGD_L2_REPORT, {})]
    else:
        stated = {"alpha": REPORT_ALPHA, "steps": REPORT_STATED_STEPS}
        pgds = [(AttackName.PGD_LINF, stated), (AttackName.PGD_L2, stated)]
    return tuple(AttackSpec(name, REPORT_EPS, params) for name, params in [(AttackName.FGSM, {}), *pgds])


def run_attack(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The adversarial examples of `spec` for (x, y); `generator` drives any random start."""
    entry = ATTACKS[spec.name]
    kwargs = spec.resolved_params()
    if "generator" in inspect.signature(entry.fn).parameters:
        kwargs["generator"] = generator
    return entry.fn(model, x, y, eps=spec.eps, **kwargs)


def attack_in_batches(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                      generator: torch.Generator | None = None,
                      progress: str | None = None) -> torch.Tensor:
    """`run_attack` over (x, y) in chunks of `batch_size`; x_adv on x's device.

    The chunks run in order and share `generator`, so a seeded generator gives the same result
    for the same batch size. `progress`, when given, labels a tqdm bar (on stderr).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(x) != len(y):
        raise UsageError(f"x and y must hold the same number of examples, got {len(x)} and {len(y)}")
    out = torch.empty_like(x)
    starts: Iterable[int] = range(0, len(x), batch_size)
    if progress is not None:
        starts = tqdm(starts, desc=progress, total=math.ceil(len(x) / batch_size), unit="batch", leave=False,
                      disable=not sys.stderr.isatty())  # a bar in a pipe or CI log redraws into many lines
    for i in starts:
        out[i:i + batch_size] = run_attack(spec, model, x[i:i + batch_size], y[i:i + batch_size], generator)
    return out
