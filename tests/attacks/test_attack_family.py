"""R-FGSM, I-FGSM, MI-FGSM, PGD-CW and APGD: update rules by hand, APGD's schedule and strength,
registry defaults and bad arguments. Their generic properties (threat model, accuracy, eps = 0,
targeted, model state, a Mixture) run over the attack table in test_attacks.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.attacks import (
    AttackSpec,
    apgd,
    apgd_checkpoints,
    cw_objective,
    dlr_objective,
    fgsm,
    ifgsm,
    mifgsm,
    pgd,
    pgd_cw,
    rfgsm,
)
from tests.attacks.attack_table import accuracy as acc

# --- update rules by hand -----------------------------------------------------------------------

def test_mifgsm_momentum_matches_the_hand_worked_l1_update():
    """A linear model z = W x: the CE input gradient is W^T (softmax(z) - e_y), computed here in
    closed form; g <- mu g + grad / ||grad||_1 and x <- clip(x + eps/k sign(g)) (Dong et al. eq. 6)."""
    W = torch.tensor([[1.0, -2.0, 0.5], [-0.5, 1.0, 3.0], [0.2, 0.1, -1.0]])
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(W)
    x = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.4]])
    y = torch.tensor([0, 2])
    eps, k, mu = 0.3, 3, 0.7
    g, x_t = torch.zeros_like(x), x.clone()
    for _ in range(k):
        p = torch.softmax(x_t @ W.T, dim=1)
        grad = (p - nn.functional.one_hot(y, 3).float()) @ W
        g = mu * g + grad / grad.abs().sum(1, keepdim=True)
        x_t = torch.min(torch.max(x_t + eps / k * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(mifgsm(model, x, y, eps=eps, steps=k, mu=mu), x_t, atol=1e-6)
    assert torch.allclose(mifgsm(model, x, y, eps=eps, steps=k, mu=0.0), ifgsm(model, x, y, eps=eps, steps=k))


def test_l1_normalization_differs_from_signed_accumulation():
    """A gradient that is large on one coordinate at step 1 and on another at step 2: the L1-normalized
    momentum keeps step 1's direction where signed accumulation would cancel it."""
    from phalanx.attacks import l1_momentum
    t = l1_momentum(1.0)
    t(torch.tensor([[10.0, -1.0]]))
    g = t(torch.tensor([[-1.0, 1.0]]))
    assert torch.equal(g.sign(), torch.tensor([[1.0, 1.0]]))  # signed accumulation: [0, 0]


def test_ifgsm_takes_k_steps_of_eps_over_k_from_x():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.zero_()
    x, y = torch.full((1, 4), 0.5), torch.tensor([0])
    # Loss of class 0 rises along -w0 (constant sign): each step moves by eps/k; the 4th pixel's gradient is 0.
    x_adv = ifgsm(model, x, y, eps=0.2, steps=4)
    assert torch.allclose(x_adv, torch.tensor([[0.3, 0.7, 0.3, 0.5]]))
    assert torch.allclose(ifgsm(model, x, y, eps=0.2, steps=1), fgsm(model, x, y, eps=0.2))


def test_rfgsm_random_step_then_fgsm_of_the_rest():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.full((3, 4), 0.5), torch.tensor([0, 1, 0])
    assert torch.allclose(rfgsm(model, x, y, eps=0.2, alpha=0.0), fgsm(model, x, y, eps=0.2))
    noise_only = rfgsm(model, x, y, eps=0.2, alpha=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((noise_only - x).abs(), torch.full_like(x, 0.2))  # alpha * sign(N(0, I))
    half = rfgsm(model, x, y, eps=0.2, generator=torch.Generator().manual_seed(0))  # alpha = eps / 2
    d = (half - x).abs()  # the two half-steps either add up to eps or cancel
    assert bool((torch.isclose(d, torch.zeros_like(d), atol=1e-6) | torch.isclose(d, torch.full_like(d, 0.2))).all())


def test_cw_objective_is_the_margin_clamped_at_kappa():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 100.0, 0.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(cw_objective(logits, y, kappa=50.0, targeted=False), torch.tensor([-4.0, 50.0]))
    assert torch.allclose(cw_objective(logits, torch.tensor([1, 1]), kappa=50.0, targeted=True),
                          torch.tensor([-4.0, 50.0]))


def test_dlr_by_hand_and_invariant_to_affine_logit_maps():
    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    y = torch.tensor([0])
    value = dlr_objective(logits, y, targeted=False)
    assert torch.allclose(value, torch.tensor([(1.0 - 3.0) / (3.0 - 0.0)]))
    assert torch.allclose(dlr_objective(7 * logits + 3, y, targeted=False), value)
    with pytest.raises(ValueError, match="at least 3 classes, got 2"):
        dlr_objective(logits[:, :2], y, targeted=False)


@pytest.mark.parametrize("steps, expected", [
    (100, [22, 41, 57, 70, 80, 87, 93, 99]),  # periods 22, 19, 16, 13, 10, 7, 6, 6 (p = 0.22, 0.41, ...)
    (10, [2, 3, 4, 5, 6, 7, 8, 9, 10]),  # int(2.2) = 2, then max(2 - 1, 1) = 1: every iteration
    (50, [11, 21, 30, 38, 45]),  # periods 11, 10, 9, 8, 7; the next (6) would end past 50
    (1, [1]),
])
def test_apgd_checkpoints_are_the_authors_whole_iteration_periods(steps, expected):
    """As fra31/auto-attack autopgd_base.py: period int(0.22 n), shorter by int(0.03 n) each time, floor int(0.06 n)."""
    assert apgd_checkpoints(steps) == expected


def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget(net, test_set):
    x, y = test_set
    eps, steps = 0.03, 10
    pgd_acc = acc(net, pgd(net, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                           generator=torch.Generator().manual_seed(0)), y)
    apgd_acc = acc(net, apgd(net, x, y, eps=eps, steps=steps, generator=torch.Generator().manual_seed(0)), y)
    assert acc(net, x, y) - pgd_acc >= 0.05  # the eps is in the interesting range
    assert apgd_acc <= pgd_acc


def test_apgd_never_returns_a_worse_point_than_its_start(net, test_set):
    x, y = test_set
    start_fooled = acc(net, x, y)
    out = apgd(net, x, y, eps=0.03, steps=5, random_start=False)
    assert acc(net, out, y) <= start_fooled


# --- registry and bad arguments ---------------------------------------------------------------

def test_registry_entries_carry_the_papers_defaults():
    assert AttackSpec("i-fgsm", 0.03).resolved_params() == {"steps": 10, "norm": "linf", "targeted": False}
    assert AttackSpec("mi-fgsm", 0.03).resolved_params()["mu"] == 1.0
    cw = AttackSpec("pgd-cw", 0.03).resolved_params()
    assert (cw["kappa"], cw["steps"]) == (50.0, 30)
    assert AttackSpec("apgd-dlr", 0.03).resolved_params()["loss"] == "dlr"
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['loss'\]"):
        AttackSpec("apgd-ce", 0.03, {"loss": "dlr"})
    apgd_t = AttackSpec("apgd-t", 0.03).resolved_params()
    assert (apgd_t["steps"], apgd_t["target_classes"], apgd_t["restarts"]) == (100, 9, 1)  # AutoAttack standard


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3])
def test_step_defaults_scale_with_eps(eps):
    """PGD's step is 2.5 * eps / steps (Madry et al.), so steps x step always exceeds eps; an explicit step wins."""
    for name in ("pgd-linf", "pgd-l2", "pgd-cw"):
        params = AttackSpec(name, eps).resolved_params()
        assert params["alpha"] == pytest.approx(2.5 * eps / params["steps"])
        assert params["alpha"] * params["steps"] > eps
        assert AttackSpec(name, eps, {"steps": 40}).resolved_params()["alpha"] == pytest.approx(2.5 * eps / 40)
        assert AttackSpec(name, eps, {"alpha": 0.001}).resolved_params()["alpha"] == 0.001
    assert AttackSpec("r-fgsm", eps).resolved_params()["alpha"] == pytest.approx(eps / 2)


BAD = [
    (lambda m, x, y: rfgsm(m, x, y, eps=0.1, alpha=0.2), r"alpha must be a number in \[0, eps\]"),
    (lambda m, x, y: mifgsm(m, x, y, eps=0.1, mu=-1.0), r"mu must be a number >= 0, got -1.0"),
    (lambda m, x, y: mifgsm(m, x, y, eps=0.1, steps=0), r"steps must be an integer >= 1, got 0"),
    (lambda m, x, y: pgd_cw(m, x, y, eps=0.1, kappa=math.nan), r"kappa must be a number >= 0, got nan"),
    (lambda m, x, y: apgd(m, x, y, eps=0.1, loss="hinge"), r"unknown loss 'hinge'; allowed: \['ce', 'cw', 'dlr'\]"),
    (lambda m, x, y: apgd(m, x, y, eps=0.1, ensemble="mean-logits"), r"needs an ensemble .* got Sequential"),
    (lambda m, x, y: apgd(m, x, y, eps=0.1, ensemble="median"), r"unknown ensemble objective 'median'"),
    (lambda m, x, y: ifgsm(m, x, y, eps=-0.1), r"eps must be .*>= 0, got -0.1"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_name_the_value(call, match, net, test_set):
    x, y = test_set
    with pytest.raises(ValueError, match=match):
        call(net, x[:4], y[:4])
