"""Our AutoAttack `standard` suite against the authors' code (../shared/oracles/auto-attack) on small
trained ensembles: robust accuracy of the mixture and of each member within 1 point; and the
ensemble suite's worst case at or below it. Skipped where ../shared is absent."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch

from phalanx.eval.measure import correct_mask
from phalanx.eval.suites import robust_after, run_suite
from phalanx.eval.whitebox import named_models

# The mixture in the default suite (~1 minute); every member, and L2, behind the slow marker (~10 minutes).
SLOW = pytest.mark.slow
CASES = [pytest.param("digits_ensemble", "linf", 0.1, ("mixture",), id="digits-linf-mixture"),
         pytest.param("cifar_ensemble", "linf", 8 / 255, ("mixture",), id="cifar-linf-mixture"),
         pytest.param("digits_ensemble", "linf", 0.1, ("member1", "member2", "member3"), id="digits-linf-members",
                      marks=SLOW),
         pytest.param("cifar_ensemble", "linf", 8 / 255, ("member1", "member2", "member3"), id="cifar-linf-members",
                      marks=SLOW),
         pytest.param("digits_ensemble", "l2", 1.0, ("mixture", "member1", "member2", "member3"), id="digits-l2",
                      marks=SLOW)]


def reference_robust_accuracy(autoattack, model, x, y, norm: str, eps: float) -> float:
    adversary = autoattack.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard",
                                      device="cpu", seed=0)
    with redirect_stdout(io.StringIO()):  # it prints a line per attack
        x_adv = adversary.run_standard_evaluation(x, y, bs=len(y))
    return float(correct_mask(model, x_adv, y).float().mean())


@pytest.mark.parametrize("fixture,norm,eps,models", CASES)
def test_standard_suite_agrees_with_the_reference_within_one_point(fixture, norm, eps, models, reference_autoattack,
                                                                   request):
    mixture, x, y = request.getfixturevalue(fixture)
    for name, model in named_models(mixture):
        if name not in models:
            continue
        clean = correct_mask(model, x, y)
        ours = robust_after(run_suite(model, x, y, "autoattack", eps=eps, norm=norm, clean_correct=clean,
                                      batch_size=len(y)), clean)
        theirs = reference_robust_accuracy(reference_autoattack, model, x, y, norm, eps)
        acc = float(ours.float().mean())
        assert abs(acc - theirs) <= 0.01, f"{fixture} {name} {norm} {eps:g}: ours {acc:.3f}, reference {theirs:.3f}"
        if name == "mixture" and fixture == "digits_ensemble":  # the ensemble suite once, where it is cheap
            ensemble = robust_after(run_suite(model, x, y, "ensemble", eps=eps, norm=norm, clean_correct=clean,
                                              batch_size=len(y)), clean)
            worst = float((ours & ensemble).float().mean())
            assert worst <= theirs + 0.01, f"{fixture} worst case {worst:.3f} above the reference {theirs:.3f}"
            assert acc < float(clean.float().mean())  # the suite is not a no-op


def test_suite_records_hold_each_stage_and_the_worst_case_covers_both_suites(digits_ensemble):
    from phalanx.attacks import AttackSpec
    from phalanx.config import SuiteConfig
    from phalanx.eval.whitebox import evaluate_whitebox

    mixture, x, y = digits_ensemble
    x, y = x[:40], y[:40]
    records = evaluate_whitebox(mixture, x, y, [AttackSpec("pgd-linf", 0.1)],
                                suites=[SuiteConfig("autoattack", 0.1, models="mixture"),
                                        SuiteConfig("ensemble", 0.1, models="mixture")])
    mix = {r["attack"]: r for r in records if r["model"] == "mixture"}
    stages = mix["autoattack"]["params"]["stages"]
    assert [s["attack"] for s in stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [s["robust_after"] for s in stages] == sorted((s["robust_after"] for s in stages), reverse=True)
    assert stages[0]["params"]["steps"] == 100 and stages[3]["params"]["queries"] == 5000
    objectives = ["apgd-ce-mean-logits", "apgd-dlr-mean-logits", "apgd-ce-member-sum", "apgd-mora"]
    assert all(mix[o]["params"]["suite"] == "ensemble" for o in objectives)
    worst = mix["strongest"]
    assert set(worst["params"]["attacks"]) == {"pgd-linf", "autoattack", *objectives}
    assert worst["accuracy"] <= min(mix[a]["accuracy"] for a in ["pgd-linf", "autoattack", *objectives])
    assert "ci95" in worst and worst["ci95"][0] <= worst["accuracy"] <= worst["ci95"][1]
    assert not any(r["attack"] in ("autoattack", *objectives) for r in records if r["model"] != "mixture")
    assert all(r["max_perturbation"] <= 0.1 + 1e-6 for r in records if "max_perturbation" in r)
    torch.testing.assert_close(torch.tensor(mix["autoattack"]["accuracy"]),
                               torch.tensor(stages[-1]["robust_after"]))
