"""White-box robustness of each member and of the mixture, as JSON records (DESIGN.md contract)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from phalanx.attacks import ATTACKS, AttackSpec, attack_in_batches
from phalanx.attacks.losses import is_ensemble
from phalanx.config import SuiteConfig
from phalanx.eval.measure import accuracy, correct_mask, max_perturbation
from phalanx.eval.sanity import apply_sanity_checks, large_eps_check
from phalanx.eval.stats import add_ci95
from phalanx.eval.suites import applies_to, robust_after, run_suite, stage_record
from phalanx.models import Mixture

__all__ = ["accuracy", "correct_mask", "evaluate_whitebox", "max_perturbation", "named_models",
           "strongest_records"]


def convergence_spec(spec: AttackSpec) -> AttackSpec | None:
    """The same attack with twice the steps and more restarts (`--check-convergence`), or None for an
    attack without steps. A derived step is derived again (PGD: 2.5 * eps / (2 * steps)); an explicit
    one is kept, so the attack can also walk twice as far."""
    entry = ATTACKS[spec.name]
    used = spec.resolved_params()
    if "steps" not in entry.tunable():
        return None
    params = dict(spec.params) | {"steps": 2 * used["steps"]}
    if "restarts" in entry.tunable():
        params["restarts"] = max(2 * used["restarts"], 3)
        if "random_start" in entry.tunable():
            params["random_start"] = True
    return AttackSpec(spec.name, spec.eps, params)


def strongest_name(norm: str) -> str:
    """The pseudo-attack name of the per-example worst case over a norm's attacks."""
    return "strongest" if norm == "linf" else f"strongest-{norm}"


def strongest_records(masks: dict[tuple[str, str, float], list[tuple[str, torch.Tensor]]],
                      clean: dict[str, torch.Tensor], *, source: str, seed: int) -> list[dict[str, Any]]:
    """One "strongest" record per (model, norm, eps) with two or more attacks: an example counts as
    robust only if it is classified correctly clean and under every attack (the per-example worst case)."""
    records = []
    for (model, norm, eps), runs in masks.items():
        if len(runs) < 2:
            continue
        robust = clean[model].clone() if model in clean else torch.ones_like(runs[0][1])
        for _, mask in runs:
            robust &= mask
        records.append({"model": model, "attack": strongest_name(norm), "eps": eps,
                        "accuracy": float(robust.float().mean()) if len(robust) else 0.0, "n": len(robust),
                        "params": {"norm": norm, "attacks": [name for name, _ in runs]}, "source": source,
                        "seed": seed, "wall_time_s": 0.0})
    return records


def named_models(mixture: Mixture) -> list[tuple[str, nn.Module]]:
    """Each member (`member1`, ...) and the mixture, in table order."""
    return [(f"member{i + 1}", m) for i, m in enumerate(mixture.members)] + [("mixture", mixture)]


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, examples: int, repeats: int,
                   seed: int, batch_size: int) -> tuple[float, float]:
    """Mean and standard deviation of clean accuracy over `repeats` random subsets of size `examples`.

    The report averages clean accuracy "on 10 tests"; with a deterministic model, repeats only
    differ by the subset of the test split they draw.
    """
    gen = torch.Generator().manual_seed(seed)
    values = []
    for r in range(repeats):
        idx = torch.arange(len(y)) if r == 0 and repeats == 1 else torch.randperm(len(y), generator=gen)
        idx = idx[:examples]
        values.append(accuracy(model, x[idx], y[idx], batch_size))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if repeats > 1 else 0.0


def evaluate_whitebox(mixture: Mixture, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[AttackSpec], *,
                      examples: int | None = None, clean_repeats: int = 1, seed: int = 0, batch_size: int = 500,
                      progress: bool = False, large_eps: float | None = None, suites: Sequence[SuiteConfig] = (),
                      check_convergence: bool = False, models: str = "all") -> list[dict[str, Any]]:
    """Clean and white-box adversarial accuracy of every member and of the mixture, sanity-checked.

    Each model is attacked through its own gradients (a member alone, or the whole mixture).
    Returns one record per (model, attack) with accuracy, n, the parameters actually used, source,
    seed, wall time, `max_perturbation` (largest norm of x_adv - x, in the attack's norm) and
    `warnings`; one record per suite (`suites.run_suite`: "autoattack" with its stages, or one per
    objective of the ensemble suite, on the mixture only); then one "strongest" record per (model,
    norm, eps) run with two or more attacks (the per-example worst case over all of them, see
    `strongest_records`). With `check_convergence`, each iterative attack is run again with twice the
    steps and more restarts (`convergence_spec`): its accuracy is kept in the record's `convergence`,
    a drop of more than 1 point is a sanity warning, and its examples count in the worst case. With
    `large_eps`, each model also gets a PGD-Linf record at that eps (`sanity.large_eps_check`) that
    warns unless accuracy falls to ~0. The records are checked by `sanity.apply_sanity_checks`:
    violations are appended to the offending record's `warnings`; call it again on the records
    (idempotent) for the document's `sanity` section. `models` "mixture" skips the members.
    """
    n = len(y) if examples is None else min(examples, len(y))
    xs, ys = x[:n], y[:n]
    records: list[dict[str, Any]] = []
    masks: dict[tuple[str, str, float], list[tuple[str, torch.Tensor]]] = {}
    clean_masks: dict[str, torch.Tensor] = {}
    for name, model in named_models(mixture):
        if models == "mixture" and name != "mixture":
            continue
        started = time.perf_counter()
        mean, std = clean_accuracy(model, x, y, examples=n, repeats=clean_repeats, seed=seed, batch_size=batch_size)
        records.append({"model": name, "attack": "clean", "eps": 0.0, "accuracy": mean, "accuracy_std": std,
                        "n": n, "repeats": clean_repeats, "params": {}, "source": "white-box", "seed": seed,
                        "wall_time_s": time.perf_counter() - started})
        clean_masks[name] = correct_mask(model, xs, ys, batch_size)
        records[-1]["accuracy_attacked"] = float(clean_masks[name].float().mean())  # clean on the attacked subset
        for spec in attacks:
            if ATTACKS[spec.name].ensemble_only and not is_ensemble(model):
                continue  # an ensemble objective; a single member has only its own output
            label = f"{name} {spec.name.value} eps={spec.eps:g}" if progress else None
            record, correct = attack_record(name, model, spec, xs, ys, seed=seed, batch_size=batch_size, progress=label)
            key = (name, record["params"]["norm"], spec.eps)
            masks.setdefault(key, []).append((spec.name.value, correct))
            again = convergence_spec(spec) if check_convergence else None
            if again is not None:
                longer, longer_correct = attack_record(name, model, again, xs, ys, seed=seed, batch_size=batch_size,
                                                        progress=f"{label} (convergence)" if progress else None)
                record["convergence"] = {k: longer[k] for k in ("accuracy", "params", "wall_time_s")}
                masks[key].append((f"{spec.name.value} (convergence)", longer_correct))
            records.append(record)
        for suite in suites:
            if suite.models == "mixture" and name != "mixture" or not applies_to(suite.name, model):
                continue
            records += _suite_records(name, model, suite, xs, ys, clean_masks[name], masks, seed=seed,
                                      batch_size=batch_size, progress=progress)
        if large_eps is not None:
            started = time.perf_counter()
            check = large_eps_check(model, xs, ys, eps=large_eps, seed=seed)
            records.append({"model": name, "attack": "pgd-linf", "eps": large_eps, "accuracy": check["accuracy"],
                            "n": n, "params": {"steps": check["steps"], "alpha": 2.5 * large_eps / check["steps"],
                                               "check": "large-eps", "max_accuracy": check["max_accuracy"]},
                            "source": "white-box", "seed": seed, "wall_time_s": time.perf_counter() - started})
    records += strongest_records(masks, clean_masks, source="white-box", seed=seed)
    add_ci95(records)
    apply_sanity_checks(records)
    return records


def attack_record(name: str, model: nn.Module, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor, *, seed: int,
                   batch_size: int, progress: str | None) -> tuple[dict[str, Any], torch.Tensor]:
    """One attack on one model: its record (parameters as used) and which examples it left correct."""
    started = time.perf_counter()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_adv = attack_in_batches(spec, model, x, y, batch_size, generator=gen, progress=progress)
    correct = correct_mask(model, x_adv, y, batch_size)
    params, budget = spec.resolved_params(), spec.budget()
    return {"model": name, "attack": spec.name.value, "eps": spec.eps,
            "accuracy": float(correct.float().mean()) if len(y) else 0.0, "n": len(y), "params": params,
            "source": "white-box", "seed": seed, "wall_time_s": time.perf_counter() - started,
            "max_perturbation": max_perturbation(x_adv, x, params["norm"]),
            **({"budget": budget} if budget != spec.eps else {})}, correct


def _suite_records(name: str, model: nn.Module, suite: SuiteConfig, x: torch.Tensor, y: torch.Tensor,
                   clean: torch.Tensor, masks: dict[tuple[str, str, float], list[tuple[str, torch.Tensor]]], *,
                   seed: int, batch_size: int, progress: bool) -> list[dict[str, Any]]:
    """The records of one suite on one model; each verdict joins `masks` for the worst case."""
    stages = run_suite(model, x, y, suite.name, eps=suite.eps, norm=suite.norm, clean_correct=clean, seed=seed,
                       batch_size=batch_size, progress=f"{name} {suite.name} eps={suite.eps:g}" if progress else None)
    n = len(y)
    key = (name, suite.norm, suite.eps)
    if suite.name == "autoattack":
        robust = robust_after(stages, clean)
        masks.setdefault(key, []).append((suite.name, robust))
        attack = "autoattack" if suite.norm == "linf" else "autoattack-l2"
        return [{"model": name, "attack": attack, "eps": suite.eps,
                 "accuracy": float(robust.float().mean()) if n else 0.0, "n": n,
                 "params": {"suite": "autoattack", "version": "standard", "norm": suite.norm,
                            "stages": [stage_record(s) for s in stages]},
                 "source": "white-box", "seed": seed, "wall_time_s": sum(s.wall_time_s for s in stages),
                 "max_perturbation": max((s.max_perturbation for s in stages), default=0.0)}]
    out = []
    for stage in stages:
        masks.setdefault(key, []).append((stage.spec.name.value, stage.robust))
        out.append({"model": name, "attack": stage.spec.name.value, "eps": suite.eps,
                    "accuracy": float(stage.robust.float().mean()) if n else 0.0, "n": n,
                    "params": stage.spec.resolved_params() | {"suite": "ensemble"}, "source": "white-box",
                    "seed": seed, "wall_time_s": stage.wall_time_s, "max_perturbation": stage.max_perturbation})
    return out
