"""Sanity checks of an evaluation: they stay quiet on a sound one and shout on a broken one."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from phalanx.attacks import AttackSpec
from phalanx.eval.sanity import (
    PREFIX,
    apply_sanity_checks,
    check_iterative_beats_one_step,
    check_monotone_in_eps,
    check_perturbation_budget,
    check_whitebox_below_transfer,
    large_eps_check,
)
from phalanx.eval.tables import accuracy_table
from phalanx.eval.whitebox import evaluate_whitebox
from phalanx.models import Mixture

CLASSES, SIZE = 4, 8


def make_task(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    signs = 2 * torch.randint(0, 2, (CLASSES, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(5)) - 1
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return (0.5 + 0.08 * signs[y] + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1), y


@functools.cache
def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    x, y = make_task(seed + 10, 512)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def net(seed: int) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    model.load_state_dict(_weights(seed))
    return model.eval()


class Masked(nn.Module):
    """Gradient masking in its plainest form: the input gradient is zero everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.detach()) + 0 * x.sum()


ATTACKS = [AttackSpec("fgsm", 0.05), AttackSpec("pgd-linf", 0.05, {"alpha": 0.0125, "steps": 10}),
           AttackSpec("i-fgsm", 0.05, {"steps": 10}), AttackSpec("fgsm", 0.1),
           AttackSpec("pgd-linf", 0.1, {"alpha": 0.025, "steps": 10})]


def test_a_sound_evaluation_has_no_warnings_and_a_strongest_row():
    x, y = make_task(1, 128)
    records = evaluate_whitebox(Mixture([net(0), net(1)]), x, y, ATTACKS, batch_size=64, large_eps=0.5)
    assert all(r["warnings"] == [] for r in records), [w for r in records for w in r["warnings"]]
    for r in records:
        if r["attack"] not in ("clean", "strongest") and "check" not in r["params"]:
            assert 0 < r["max_perturbation"] <= r["eps"] + 1e-6
    for model in ("member1", "member2", "mixture"):
        for eps in (0.05, 0.1):
            attacked = [r["accuracy"] for r in records
                        if r["model"] == model and r["eps"] == eps and r["attack"] != "strongest"]
            (strongest,) = [r for r in records if r["model"] == model and r["eps"] == eps and r["attack"] == "strongest"]
            assert strongest["accuracy"] <= min(attacked)
    section = apply_sanity_checks(records)
    assert section["passed"] and section["checks"]["large-eps"]["passed"]
    header, _ = accuracy_table(records)
    assert "strongest 0.05" in header


def test_a_masked_model_fails_the_large_eps_check_loudly():
    x, y = make_task(1, 64)
    assert large_eps_check(net(0), x, y)["passed"]
    result = large_eps_check(Masked(net(0)), x, y)
    assert not result["passed"] and result["accuracy"] > 0.5 and PREFIX in result["warning"]
    records = evaluate_whitebox(Mixture([Masked(net(0))]), x, y, ATTACKS[:2], batch_size=64, large_eps=0.5)
    section = apply_sanity_checks(records)
    assert not section["passed"] and section["checks"]["large-eps"]["violations"]
    assert any("large eps 0.5" in w for r in records for w in r["warnings"])


def _rec(attack, eps, acc, model="m", **extra):
    return {"model": model, "attack": attack, "eps": eps, "accuracy": acc, "n": 100, "params": {},
            "source": "white-box", "seed": 0, "wall_time_s": 0.0, **extra}


def test_accuracy_rising_with_eps_or_above_clean_is_flagged():
    records = [_rec("clean", 0.0, 0.9), _rec("pgd-linf", 0.03, 0.4), _rec("pgd-linf", 0.06, 0.5),
               _rec("fgsm", 0.03, 0.95)]
    found = check_monotone_in_eps(records)
    assert {(v.check, v.record) for v in found} == {("monotone-in-eps", 2), ("below-clean", 3)}
    assert check_monotone_in_eps(records[:2]) == []


def test_iterative_weaker_than_one_step_is_flagged():
    records = [_rec("fgsm", 0.03, 0.3), _rec("pgd-linf", 0.03, 0.5), _rec("i-fgsm", 0.03, 0.2),
               _rec("mi-fgsm", 0.06, 0.9)]
    assert [v.record for v in check_iterative_beats_one_step(records)] == [1]


def test_perturbation_outside_the_budget_is_flagged_and_warnings_are_added_once():
    records = [_rec("fgsm", 0.03, 0.3, max_perturbation=0.0300001), _rec("pgd-linf", 0.03, 0.2, max_perturbation=0.04)]
    assert [v.record for v in check_perturbation_budget(records)] == [1]
    first = apply_sanity_checks(records)
    apply_sanity_checks(records)
    assert records[0]["warnings"] == [] and len(records[1]["warnings"]) == 1
    assert not first["checks"]["budget"]["passed"] and "exceeds the budget" in records[1]["warnings"][0]


def test_whitebox_above_transfer_is_flagged():
    wb = [_rec("clean", 0.0, 0.9), _rec("fgsm", 0.03, 0.5), _rec("pgd-linf", 0.03, 0.3)]
    tr = [_rec("clean", 0.0, 0.9, source="transfer:s"), _rec("i-fgsm", 0.03, 0.35, source="transfer:s"),
          _rec("mi-fgsm", 0.03, 0.2, source="transfer:s")]
    found = check_whitebox_below_transfer(wb, tr)
    assert [v.record for v in found] == [2] and "too weak" in found[0].message


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_large_eps_check_reports_its_settings(eps):
    x, y = make_task(2, 16)
    out = large_eps_check(net(0), x, y, eps=0.5 + eps, steps=5)
    assert out["n"] == 16 and out["steps"] == 5 and out["eps"] == 0.5 + eps
