"""The DVERGE report's unprojected PGD: it must walk past eps exactly as the report's script does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phalanx.attacks import AttackSpec, run_attack
from phalanx.attacks.report_pgd import reach, report_pgd
from phalanx.eval.sanity import check_perturbation_budget


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = 0.25 + 0.5 * torch.rand(n, 3, 8, 8, generator=gen)  # away from 0 and 1: no pixel clamp binds
    return x, torch.randint(0, 10, (n,), generator=gen)


def test_linf_walks_alpha_per_step_beyond_eps():
    x, y = _batch()
    x_adv = report_pgd(_linear_model(), x, y, eps=0.03, alpha=0.007, steps=5, norm="linf")
    linf = (x_adv - x).flatten(1).abs().amax(1)
    # a linear model's gradient sign never changes: every pixel moves 5 x 0.007 = 0.035 > eps
    assert torch.allclose(linf, torch.full_like(linf, 0.035), atol=1e-6)
    assert reach(0.03, 0.007, 5, "linf") == pytest.approx(0.035)


def test_linf_step_is_clamped_to_eps():
    x, y = _batch()
    x_adv = report_pgd(_linear_model(), x, y, eps=0.01, alpha=0.05, steps=1, norm="linf")
    assert (x_adv - x).abs().max() == pytest.approx(0.01, abs=1e-6)


def test_l2_adds_eps_per_step_and_is_never_projected():
    x, y = _batch()
    x_adv = report_pgd(_linear_model(), x, y, eps=0.03, steps=5, norm="l2")
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    assert torch.allclose(l2, torch.full_like(l2, 0.15), atol=1e-4)  # 5 collinear steps of norm eps
    assert reach(0.03, 0.007, 5, "l2") == pytest.approx(0.15)


def test_deterministic_and_in_pixel_range():
    x, y = _batch()
    x[0] = 1.0
    model = _linear_model()
    a = report_pgd(model, x, y, eps=0.03, norm="l2")
    b = report_pgd(model, x, y, eps=0.03, norm="l2")
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_registry_entries_state_their_budget_and_the_sanity_check_uses_it():
    linf, l2 = AttackSpec("pgd-linf-report", 0.03), AttackSpec("pgd-l2-report", 0.03)
    assert linf.resolved_params()["steps"] == 5 and linf.resolved_params()["alpha"] == 0.007
    assert linf.budget() == pytest.approx(0.035) and l2.budget() == pytest.approx(0.15)
    assert AttackSpec("pgd-linf", 0.03).budget() == 0.03
    x, y = _batch(4)
    x_adv = run_attack(l2, _linear_model(), x, y)
    pert = float((x_adv - x).flatten(1).norm(dim=1).max())
    record = {"model": "m", "attack": "pgd-l2-report", "eps": 0.03, "max_perturbation": pert}
    assert check_perturbation_budget([record])  # beyond eps: a violation without its budget
    assert not check_perturbation_budget([record | {"budget": l2.budget()}])
