"""The attack template on hand-worked cases: projection, steps, random starts, losses, model state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.attacks import (
    ATTACKS, Loss, Norm, attack, attack_mode, coerce_loss, coerce_norm, cw_hinge, fgsm, fgsm_per_example,
    fgsm_rs, frozen_parameters, iterate, loss_objective, max_gradient_norm, pgd, pgd_cw, project,
    sample_in_ball,
)
from phalanx.attacks.core import attack_objective, is_worse_case, per_example_loss, steepest_step
from phalanx.errors import UsageError

W = torch.tensor([1.0, -2.0, 0.5, 0.0])


def linear_two_class() -> nn.Module:
    """logits = (w.x, 0): for y = 0 the CE gradient is -w * sigmoid(-w.x), so its sign is -sign(w)."""
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.stack([W, torch.zeros(4)]))
    return model


@pytest.mark.parametrize("norm", ["linf", "l2", Norm.LINF, Norm.L2])
def test_norm_coerced_from_strings_and_enum(norm):
    assert coerce_norm(norm) in (Norm.LINF, Norm.L2)


def test_unknown_norm_and_loss_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown norm 'l1'.*'linf', 'l2'"):
        coerce_norm("l1")
    with pytest.raises(ValueError, match=r"unknown loss 'mse'.*'ce', 'cw'"):
        coerce_loss("mse")


def test_project_linf_clips_each_pixel_then_the_pixel_range():
    x = torch.tensor([[0.5, 0.5, 0.95, 0.02]])
    x_adv = torch.tensor([[0.9, 0.45, 1.3, -0.5]])
    out = project(x_adv, x, eps=0.1, norm="linf")
    assert torch.allclose(out, torch.tensor([[0.6, 0.45, 1.0, 0.0]]))


def test_project_l2_rescales_onto_the_sphere_and_keeps_points_inside():
    x = torch.full((2, 2), 0.5)
    x_adv = torch.tensor([[0.5 + 0.3, 0.5 + 0.4], [0.5 + 0.03, 0.5 - 0.04]])  # norms 0.5 and 0.05
    out = project(x_adv, x, eps=0.1, norm="l2")
    assert torch.allclose(out[0], torch.tensor([0.5 + 0.06, 0.5 + 0.08]))
    assert torch.equal(out[1], x_adv[1])


def test_project_l2_then_clamp_stays_in_the_ball():
    x = torch.tensor([[0.98, 0.5]])
    out = project(torch.tensor([[2.0, 0.5]]), x, eps=0.5, norm="l2")
    assert torch.allclose(out, torch.tensor([[1.0, 0.5]]))


def test_steepest_step_is_sign_or_unit_l2_and_zero_for_zero_gradient():
    g = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    assert torch.equal(steepest_step(g, Norm.LINF), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.allclose(steepest_step(g, Norm.L2), torch.tensor([[0.6, -0.8], [0.0, 0.0]]))


def test_one_pgd_linf_step_moves_by_alpha_times_the_hand_computed_gradient_sign():
    x = torch.full((1, 4), 0.5)
    x_adv = pgd(linear_two_class(), x, torch.tensor([0]), eps=0.2, alpha=0.1, steps=1, random_start=False)
    assert torch.allclose(x_adv, x - 0.1 * W.sign())  # the zero weight gets no step


def test_one_pgd_l2_step_moves_by_alpha_along_the_normalized_gradient():
    x = torch.full((1, 4), 0.5)
    x_adv = pgd(linear_two_class(), x, torch.tensor([0]), eps=0.2, alpha=0.1, steps=1, norm="l2",
                random_start=False)
    assert torch.allclose(x_adv, x - 0.1 * W / math.sqrt(1 + 4 + 0.25))


def test_targeted_step_descends_the_target_loss():
    x = torch.full((1, 4), 0.5)
    # targeting class 0 raises w.x, the opposite of the untargeted step away from class 0
    x_adv = pgd(linear_two_class(), x, torch.tensor([0]), eps=0.2, alpha=0.1, steps=1, random_start=False,
                targeted=True)
    assert torch.allclose(x_adv, x + 0.1 * W.sign())


def test_steps_accumulate_until_the_ball_stops_them():
    x = torch.full((1, 4), 0.5)
    x_adv = pgd(linear_two_class(), x, torch.tensor([0]), eps=0.25, alpha=0.1, steps=5, random_start=False)
    assert torch.allclose(x_adv, x - 0.25 * W.sign())


def test_fgsm_takes_one_step_of_eps_in_either_norm():
    x = torch.full((1, 4), 0.5)
    model, y = linear_two_class(), torch.tensor([0])
    assert torch.allclose(fgsm(model, x, y, eps=0.3), x - 0.3 * W.sign())
    assert torch.allclose(fgsm(model, x, y, eps=0.3, norm="l2"), x - 0.3 * W / W.norm())


def test_sample_in_ball_is_reproducible_and_inside_the_ball():
    x = torch.full((500, 2), 0.5)
    for norm in Norm:
        a = sample_in_ball(x, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(3))
        b = sample_in_ball(x, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(3))
        c = sample_in_ball(x, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)
        dist = (a - x).abs().amax(1) if norm is Norm.LINF else (a - x).norm(dim=1)
        assert float(dist.max()) <= 0.2 + 1e-6


def test_l2_random_start_is_uniform_in_the_disc():
    x = torch.full((20000, 2), 0.5)
    r = (sample_in_ball(x, eps=0.2, norm=Norm.L2, generator=torch.Generator().manual_seed(0)) - x).norm(dim=1)
    # uniform in a disc: P(r < eps/2) = 1/4 (a uniform radius would give 1/2)
    assert abs(float((r < 0.1).float().mean()) - 0.25) < 0.02


def test_ce_and_cw_losses_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert torch.allclose(per_example_loss(logits, torch.tensor([0]), Loss.CW), torch.tensor([2.0]))
    assert torch.allclose(per_example_loss(logits, torch.tensor([1]), Loss.CW), torch.tensor([-1.0]))
    ce = -torch.log_softmax(logits, 1)[0, 2]
    assert torch.allclose(per_example_loss(logits, torch.tensor([2]), Loss.CE), ce[None])
    assert torch.allclose(attack_objective(logits, torch.tensor([2]), loss=Loss.CE, targeted=True), -ce[None])


def test_restart_selection_prefers_success_then_the_higher_loss():
    # columns: new success beats old failure even at a lower loss; a kept success is never
    # replaced, even by a success with a higher loss; between failures the higher loss wins
    best_success = torch.tensor([False, True, True, False, False])
    best_value = torch.tensor([5.0, 1.0, 1.0, 1.0, 2.0])
    success = torch.tensor([True, True, False, False, False])
    value = torch.tensor([0.5, 3.0, 9.0, 2.0, 1.0])
    better = is_worse_case(success, value, best_success, best_value)
    assert better.tolist() == [True, False, False, True, False]


def test_pgd_cw_loss_moves_against_the_true_class():
    x = torch.full((1, 4), 0.5)
    x_adv = pgd(linear_two_class(), x, torch.tensor([0]), eps=0.2, alpha=0.1, steps=1, random_start=False,
                loss="cw")
    assert torch.allclose(x_adv, x - 0.1 * W.sign())


def test_attack_mode_restores_everything_also_on_exception():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2))
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    model[2].bias.requires_grad_(False)
    grad = torch.ones(2, 2)
    model[0].weight.grad = grad
    with pytest.raises(RuntimeError, match="boom"):
        with attack_mode(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert model[0].weight.grad is grad and model[0].bias.grad is None


def test_fgsm_rs_by_hand_on_a_linear_model():
    """Linear logits: grad of CE w.r.t. x has a known sign; result = clip(start + alpha sign(g))."""
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        lin[1].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.5], [-1.0, 1.0, -2.0, -0.5]]))
    x = torch.full((1, 4), 0.5)
    y = torch.tensor([0])
    eps, alpha = 0.1, 0.125
    start_gen = torch.Generator().manual_seed(3)
    start = x + (2 * torch.rand(x.shape, generator=start_gen) - 1) * eps
    x_adv = fgsm_rs(lin, x, y, eps=eps, alpha=alpha, generator=torch.Generator().manual_seed(3))
    # CE gradient for class 0 is along w1 - w0 = [-2, 2, -4, -1]
    expected = (start + alpha * torch.tensor([[-1.0, 1.0, -1.0, -1.0]])).clamp(x - eps, x + eps)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_fgsm_per_example_steps_each_example_by_its_own_radius():
    x = torch.full((3, 4), 0.5)
    eps = torch.tensor([0.0, 0.1, 0.3])
    x_adv = fgsm_per_example(linear_two_class(), x, torch.zeros(3, dtype=torch.long), eps=eps)
    assert torch.allclose(x_adv, x - eps[:, None] * W.sign())
    with pytest.raises(UsageError, match=r"one radius per example .*shape \(3,\)"):
        fgsm_per_example(linear_two_class(), x, torch.zeros(3, dtype=torch.long), eps=torch.ones(2))
    with pytest.raises(UsageError, match=r"finite radii >= 0, got values in \[-0.1, 0.1\]"):
        fgsm_per_example(linear_two_class(), x, torch.zeros(3, dtype=torch.long),
                         eps=torch.tensor([0.1, -0.1, 0.0]))


# --- the loop takes an objective ---------------------------------------------------------------------

def test_iterate_ascends_the_objective_it_is_given():
    x = torch.full((1, 4), 0.5)
    model, y = linear_two_class(), torch.tensor([0])
    ce = iterate(model, x, y, x, eps=0.2, alpha=0.1, steps=1, norm=Norm.LINF)  # default: untargeted CE
    assert torch.allclose(ce, x - 0.1 * W.sign())
    # an objective that rewards pixel 2 only: the step moves pixel 2 alone
    up = iterate(model, x, y, x, eps=0.2, alpha=0.1, steps=1, norm=Norm.LINF,
                 objective=lambda m, z, t: z[:, 2])
    assert torch.allclose(up, x + 0.1 * torch.tensor([0.0, 0.0, 1.0, 0.0]))
    targeted = iterate(model, x, y, x, eps=0.2, alpha=0.1, steps=1, norm=Norm.LINF,
                       objective=loss_objective(targeted=True))
    assert torch.allclose(targeted, x + 0.1 * W.sign())


def test_pgd_cw_is_the_shared_loop_on_the_cw_hinge():
    x = torch.full((2, 4), 0.5)
    model, y = linear_two_class(), torch.tensor([0, 1])
    got = pgd_cw(model, x, y, eps=0.2, alpha=0.05, steps=3, kappa=0.05, random_start=False)
    expected = iterate(model, x, y, x, eps=0.2, alpha=0.05, steps=3, norm=Norm.LINF,
                       objective=cw_hinge(kappa=0.05, targeted=False))
    assert torch.equal(got, expected)
    # logits (w.x, 0) with w.x = -0.25 at x: example 0 (class 0) is misclassified with margin 0.25 > kappa,
    # so its hinge is flat and it never moves; example 1 (class 1) climbs along +sign(w), its margin
    # -0.25 -> -0.075 -> 0.1 (each step adds 0.05 * |w|_1 = 0.175), and stops once it passes kappa
    assert torch.equal(got[0], x[0])
    assert torch.allclose(got[1] - x[1], 0.1 * W.sign())


# --- the decorator every attack carries ----------------------------------------------------------------

def test_every_registered_and_training_attack_carries_the_decorator():
    fns = {entry.fn for entry in ATTACKS.values()} | {fgsm_rs, fgsm_per_example, max_gradient_norm}
    for fn in fns:
        assert callable(getattr(fn, "budget", None)) and hasattr(fn, "__wrapped__"), fn.__name__


def test_the_decorator_checks_coerces_and_restores_the_model():
    seen = {}

    @attack
    def probe(model, x, y, *, eps, norm="linf", loss="ce"):
        seen.update(norm=norm, loss=loss, training=model.training, frozen=not any(
            p.requires_grad for p in model.parameters()), x_requires_grad=x.requires_grad)
        return x

    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout()).train()
    x, y = torch.rand(3, 4, requires_grad=True), torch.zeros(3, dtype=torch.long)
    probe(model, x, y, eps=0.1, norm="l2", loss="cw")
    assert seen == {"norm": Norm.L2, "loss": Loss.CW, "training": False, "frozen": True,
                    "x_requires_grad": False}
    assert model.training and all(p.requires_grad for p in model.parameters())
    for bad, match in (({"eps": -1.0}, r"eps must be .*>= 0, got -1.0"),
                       ({"eps": 0.1, "norm": "l1"}, "unknown norm"), ({"eps": 0.1, "loss": "mse"}, "unknown loss")):
        with pytest.raises(UsageError, match=match):
            probe(model, x, y, **bad)
    with pytest.raises(UsageError, match=r"x must hold pixels in \[0, 1\]"):
        probe(model, x + 2, y, eps=0.1)
    with pytest.raises(TypeError):
        probe(model, x, y, 0.1)  # keyword-only, as the function it wraps
    with pytest.raises(TypeError, match="takes no norm argument"):
        attack(lambda model, x, y, *, eps: x)


@pytest.mark.parametrize("broken, message", [
    (lambda x, eps: (x + 2 * eps).clamp(0, 1), "left its threat model"),
    (lambda x, eps: x + 2.0, r"pixels outside \[0, 1\]|left its threat model"),
    (lambda x, eps: x[:1], r"returned \(1, 4\) for x of shape \(3, 4\)"),
], ids=["outside-the-ball", "outside-the-pixel-range", "wrong-shape"])
def test_an_attack_leaving_its_threat_model_is_a_bug_not_a_usage_error(broken, message):
    @attack(norm=Norm.LINF)
    def wrong(model, x, y, *, eps):
        return broken(x, eps)

    x, y = torch.full((3, 4), 0.5), torch.zeros(3, dtype=torch.long)
    with pytest.raises(AssertionError, match=message):
        wrong(linear_two_class(), x, y, eps=0.1)


def test_a_custom_budget_replaces_eps_and_multiple_members_are_all_in_attack_mode():
    @attack(norm=Norm.LINF, budget=lambda eps, args: 3 * eps)
    def three_steps(models, x, y, *, eps):
        assert not any(m.training for m in models)
        return (x + 3 * eps).clamp(0, 1)

    members = [nn.Sequential(nn.Linear(4, 2), nn.Dropout()).train() for _ in range(2)]
    x = torch.full((2, 4), 0.5)
    assert torch.allclose(three_steps(members, x, torch.zeros(2, dtype=torch.long), eps=0.1), x + 0.3)
    assert all(m.training for m in members) and three_steps.budget(0.1, {}) == pytest.approx(0.3)


def test_attack_mode_takes_several_models_and_frozen_parameters_restores_flags_and_grads():
    a, b = nn.Linear(2, 2).train(), nn.Linear(2, 2).train()
    b.bias.requires_grad_(False)
    grad = torch.ones(2, 2)
    a.weight.grad = grad
    with attack_mode(a, b):
        assert not a.training and not b.training
        assert not any(p.requires_grad for m in (a, b) for p in m.parameters())
    assert a.training and b.training and [p.requires_grad for p in b.parameters()] == [True, False]
    assert a.weight.grad is grad
    with frozen_parameters(a):
        assert a.training and not any(p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in a.parameters()) and a.weight.grad is grad
