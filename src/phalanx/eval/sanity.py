"""Checks that catch a broken robustness evaluation (gradient masking, too few steps, a leaky
threat model), run on the records of every evaluation.

Each check reads evaluation records (the JSON contract of DESIGN.md) and returns violations; a
violation puts a loud warning string in the offending record's `warnings` list and in the
document's `sanity` section, never an exception: a suspicious number must be seen, not lost.
The checks (after Carlini et al. 2019, "On evaluating adversarial robustness", section 5):

- accuracy never rises with eps for the same attack (and no attack beats clean accuracy);
- an iterative attack is never weaker than its one-step version at the same eps (PGD, I-FGSM vs FGSM);
- every perturbation lies inside its budget (the record's `max_perturbation` <= eps);
- every attack can reach its budget (steps x step >= eps);
- with `--check-convergence`, twice the steps and more restarts find no more than 1 point more;
- an undefended model reaches ~0% at a large eps (`large_eps_check`);
- white-box accuracy is not above transfer accuracy (`check_whitebox_below_transfer`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from phalanx.attacks import ONE_STEP_VERSION, AttackName, pgd

Record = MutableMapping[str, Any]

PREFIX = "SANITY CHECK FAILED"


@dataclass(frozen=True)
class Violation:
    check: str
    record: int  # index into the checked records
    message: str


def _key(rec: Mapping[str, Any]) -> tuple[str, str, str]:
    return rec["model"], rec["attack"], rec.get("source", "white-box")


def _fmt(acc: float) -> str:
    return f"{100 * acc:.1f}%"


def check_monotone_in_eps(records: Sequence[Mapping[str, Any]], *, tol: float = 0.01) -> list[Violation]:
    """Accuracy under one attack (same model, source) must not rise with eps, nor exceed clean accuracy.

    `tol` absorbs the sampling noise of randomized attacks (a fraction of the examples).
    """
    out: list[Violation] = []
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    clean: dict[tuple[str, str], float] = {}
    for i, rec in enumerate(records):
        if rec["attack"] == "clean":
            # compare with clean accuracy on the very examples attacked, not a mean over other subsets
            clean[(rec["model"], rec.get("source", "white-box"))] = rec.get("accuracy_attacked", rec["accuracy"])
        else:
            groups[_key(rec)].append(i)
    for (model, attack, source), idx in groups.items():
        ordered = sorted(idx, key=lambda i: records[i]["eps"])
        for a, b in pairwise(ordered):
            ra, rb = records[a], records[b]
            if rb["eps"] > ra["eps"] and rb["accuracy"] > ra["accuracy"] + tol:
                out.append(Violation("monotone-in-eps", b, (
                    f"{PREFIX}: {model} {attack}: accuracy rises with eps, {_fmt(rb['accuracy'])} at eps "
                    f"{rb['eps']:g} > {_fmt(ra['accuracy'])} at eps {ra['eps']:g} (gradient masking or too few steps?)")))
        base = clean.get((model, source))
        for i in idx:
            if base is not None and records[i]["eps"] > 0 and records[i]["accuracy"] > base + tol:
                out.append(Violation("below-clean", i, (
                    f"{PREFIX}: {model} {attack} eps {records[i]['eps']:g}: adversarial accuracy "
                    f"{_fmt(records[i]['accuracy'])} above clean accuracy {_fmt(base)}")))
    return out


def check_iterative_beats_one_step(records: Sequence[Mapping[str, Any]], *, tol: float = 0.01) -> list[Violation]:
    """An iterative attack (PGD, I-FGSM, MI-FGSM, APGD-CE) must be at least as strong as FGSM at the same eps."""
    out: list[Violation] = []
    by_key = {(rec["model"], rec["attack"], rec.get("source", "white-box"), rec["eps"]): rec["accuracy"]
              for rec in records}
    for i, rec in enumerate(records):
        try:
            one_step = ONE_STEP_VERSION.get(AttackName(rec["attack"]))
        except ValueError:
            continue
        if one_step is None:
            continue
        other = by_key.get((rec["model"], one_step.value, rec.get("source", "white-box"), rec["eps"]))
        if other is not None and rec["accuracy"] > other + tol:
            out.append(Violation("iterative-vs-one-step", i, (
                f"{PREFIX}: {rec['model']} {rec['attack']} eps {rec['eps']:g}: {_fmt(rec['accuracy'])}, weaker "
                f"than one-step {one_step.value} ({_fmt(other)}); the iterative attack is broken or masked")))
    return out


def check_perturbation_budget(records: Sequence[Mapping[str, Any]], *, slack: float = 1e-5) -> list[Violation]:
    """Every record that measured `max_perturbation` must have it within its budget (plus float
    slack): eps, or the record's `budget` for an attack whose threat model is not the eps ball
    (the DVERGE report's unprojected PGD)."""
    return [Violation("budget", i, (f"{PREFIX}: {rec['model']} {rec['attack']} eps {rec['eps']:g}: a perturbation "
                                    f"of norm {rec['max_perturbation']:.6g} exceeds the budget"))
            for i, rec in enumerate(records)
            if rec.get("max_perturbation") is not None
            and rec["max_perturbation"] > rec.get("budget", rec["eps"]) + slack]


def check_whitebox_below_transfer(whitebox: Sequence[Mapping[str, Any]], transfer: Sequence[Mapping[str, Any]],
                                  *, tol: float = 0.01) -> list[Violation]:
    """Per (model, eps, norm): the strongest white-box accuracy must not exceed the weakest-looking
    transfer accuracy, i.e. no transfer attack may do better than the white-box attacks.

    Compares the best white-box attack with every transfer record at the same model and eps
    (Linf attacks only on both sides; clean rows are skipped). Violations index `transfer`.
    """
    best: dict[tuple[str, float], tuple[float, str]] = {}
    for rec in whitebox:
        if rec["attack"] == "clean" or rec.get("params", {}).get("norm", "linf") != "linf" or "l2" in rec["attack"]:
            continue
        k = (rec["model"], rec["eps"])
        if k not in best or rec["accuracy"] < best[k][0]:
            best[k] = (rec["accuracy"], rec["attack"])
    out = []
    for i, rec in enumerate(transfer):
        wb = best.get((rec["model"], rec["eps"]))
        if rec["attack"] == "clean" or wb is None or "l2" in rec["attack"]:
            continue
        if wb[0] > rec["accuracy"] + tol:
            out.append(Violation("whitebox-below-transfer", i, (
                f"{PREFIX}: {rec['model']} eps {rec['eps']:g}: white-box {wb[1]} accuracy {_fmt(wb[0])} above "
                f"transfer {rec['attack']} accuracy {_fmt(rec['accuracy'])}; the white-box attacks are too weak")))
    return out


def large_eps_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.5, steps: int = 20,
                    max_accuracy: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """PGD-Linf at a large `eps` (0.5: any pixel may move to mid-grey) with `steps` steps of 2.5 eps / steps.

    An undefended model must fall to ~0%; accuracy above `max_accuracy` means the gradients are
    masked or broken. Returns {"eps", "steps", "accuracy", "n", "passed", "warning"} (warning None if passed).
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_adv = pgd(model, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps, generator=gen)
    with torch.no_grad():
        acc = float((model(x_adv).argmax(1) == y).float().mean()) if len(y) else 0.0
    passed = acc <= max_accuracy
    return {"eps": eps, "steps": steps, "accuracy": acc, "n": len(y), "max_accuracy": max_accuracy,
            "passed": passed, "warning": None if passed else _large_eps_message(acc, eps, steps, max_accuracy)}


def _large_eps_message(acc: float, eps: float, steps: int, max_accuracy: float) -> str:
    return (f"{PREFIX}: accuracy {_fmt(acc)} under PGD-Linf at large eps {eps:g} ({steps} steps); "
            f"expected <= {_fmt(max_accuracy)}: gradient masking or a broken attack")


def check_large_eps(records: Sequence[Mapping[str, Any]]) -> list[Violation]:
    """Records made by `large_eps_check` (params "check": "large-eps") must be at or below their max accuracy."""
    out = []
    for i, rec in enumerate(records):
        params = rec.get("params") or {}
        if params.get("check") == "large-eps" and rec["accuracy"] > params["max_accuracy"]:
            out.append(Violation("large-eps", i, f"{rec['model']}: " + _large_eps_message(
                rec["accuracy"], rec["eps"], params["steps"], params["max_accuracy"])))
    return out


def check_reachable_budget(records: Sequence[Mapping[str, Any]], *, slack: float = 1e-9) -> list[Violation]:
    """An attack whose steps cannot reach the budget (steps x step < eps, in either norm: each step
    moves at most `alpha` in the attack's norm) under-reports its own threat model."""
    out = []
    for i, rec in enumerate(records):
        params = rec.get("params") or {}
        alpha, steps = params.get("alpha"), params.get("steps")
        if params.get("check") == "large-eps" or not isinstance(alpha, (int, float)) or not isinstance(steps, int):
            continue
        if steps * alpha < rec["eps"] - slack:
            out.append(Violation("reachable-budget", i, (
                f"{PREFIX}: {rec['model']} {rec['attack']} eps {rec['eps']:g}: {steps} steps of {alpha:g} reach only "
                f"{steps * alpha:g} < eps; the attack cannot use its budget (give fewer --alpha/--steps overrides: "
                f"its default step is 2.5 * eps / steps)")))
    return out


def check_convergence(records: Sequence[Mapping[str, Any]], *, tol: float = 0.01) -> list[Violation]:
    """An attack rerun with twice the steps and more restarts (`--check-convergence`) must not find
    more than `tol` additional examples: otherwise the first run had not converged."""
    out = []
    for i, rec in enumerate(records):
        again = rec.get("convergence")
        if again is not None and again["accuracy"] < rec["accuracy"] - tol:
            p = again["params"]
            out.append(Violation("convergence", i, (
                f"{PREFIX}: {rec['model']} {rec['attack']} eps {rec['eps']:g}: {_fmt(rec['accuracy'])} falls to "
                f"{_fmt(again['accuracy'])} with {p.get('steps')} steps"
                f"{' and ' + str(p['restarts']) + ' restarts' if 'restarts' in p else ''}; not converged, "
                f"report the longer run")))
    return out


CHECKS = ("monotone-in-eps", "below-clean", "iterative-vs-one-step", "budget", "reachable-budget", "convergence",
          "large-eps")


def apply_sanity_checks(records: Sequence[Record], *, tol: float = 0.01,
                        extra: Sequence[Violation] = (), white_box: bool = True) -> dict[str, Any]:
    """Run the record checks, append each violation's message to its record's `warnings` (every
    record gets the key), and return the document's `sanity` section:
    {"passed": bool, "checks": {name: {"passed": bool, "violations": [message, ...]}}}.
    `extra` violations (e.g. from `check_whitebox_below_transfer`) are added the same way.
    With `white_box=False` (transfer examples) the iterative-vs-one-step check is skipped:
    iterative examples overfit the surrogate and often transfer worse (Kurakin et al. 2017).
    """
    iterative = check_iterative_beats_one_step(records, tol=tol) if white_box else []
    violations = [*check_monotone_in_eps(records, tol=tol), *iterative,
                  *check_perturbation_budget(records), *check_reachable_budget(records),
                  *check_convergence(records, tol=tol), *check_large_eps(records), *extra]
    for rec in records:
        rec.setdefault("warnings", [])
    section: dict[str, dict[str, Any]] = {name: {"passed": True, "violations": []} for name in CHECKS}
    for v in violations:
        if v.message not in records[v.record]["warnings"]:
            records[v.record]["warnings"].append(v.message)
        entry = section.setdefault(v.check, {"passed": True, "violations": []})
        entry["passed"] = False
        entry["violations"].append(v.message)
    return {"passed": not violations, "checks": section}
