"""Every attack on a small real task: the threat model holds, accuracy drops, state is left alone.

The generic properties run over the attack table (attack_table.py: one row per registered attack,
built from the registry, plus a few variants); the task and its fixture nets live there too.
Then the template's own behaviour (restarts, no_grad, BatchNorm), bad arguments and the registry.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from phalanx.attacks import (
    ATTACKS,
    AttackEntry,
    AttackName,
    AttackSpec,
    Norm,
    attack_in_batches,
    fgsm,
    pgd,
    run_attack,
)
from tests.attacks.attack_table import (
    CLASSES,
    EXCEPTIONS,
    EXCLUDED,
    SIZE,
    TABLE,
    VARIANTS,
    accuracy,
    assert_in_threat_model,
    attacked,
    missing_rule,
    over,
    train_net,
)

# --- the table covers the registry ------------------------------------------------------------------

def test_every_registered_attack_has_a_row_or_a_stated_exclusion():
    """A newly registered attack gets a row from the rules of attack_table.py; where they have no rule
    for it (its norm, a parameter), this fails naming it until a rule is added or it is EXCLUDED."""
    rows = [row.name for row in TABLE if row not in VARIANTS]
    assert len(rows) == len(set(rows)) and set(rows).isdisjoint(EXCLUDED)
    assert all(reason.strip() for reason in EXCLUDED.values())
    assert set(EXCEPTIONS) <= set(rows)  # no exception left for an attack without a row
    assert {name.value: missing_rule(name) for name in AttackName if name not in {*rows, *EXCLUDED}} == {}


def test_an_attack_the_rules_cannot_run_is_named(monkeypatch):
    entry = ATTACKS[AttackName.PGD_LINF]
    monkeypatch.setitem(ATTACKS, AttackName.PGD_LINF, replace(entry, fixed={**entry.fixed, "norm": "l1"}))
    assert "norm 'l1' has no eps scale" in missing_rule(AttackName.PGD_LINF)

    def costly(model, x, y, *, eps, norm="linf", iterations=10_000):
        return x

    monkeypatch.setitem(ATTACKS, AttackName.PGD_LINF, AttackEntry(costly, fixed={"norm": Norm.LINF}))
    assert "parameters ['iterations'] are in neither" in missing_rule(AttackName.PGD_LINF)


# --- generic properties, over the table ---------------------------------------------------------------

@over()
@pytest.mark.parametrize("scale", ["medium", "large"])
def test_threat_model_holds_and_input_is_untouched(row, scale):
    x, _, x_adv, x_untouched = attacked(row, scale)
    eps, budget = row.eps(scale), row.budget(row.eps(scale))
    assert (budget == eps) is row.projected  # only an unprojected attack's reach exceeds eps
    assert_in_threat_model(x_adv, x, budget, row.norm)
    assert x_untouched
    assert not x_adv.requires_grad


@over()
def test_accuracy_drops_and_vanishes_at_large_eps(row):
    model, medium, large = row.model(), attacked(row, "medium"), attacked(row, "large")
    x, y = medium.x, medium.y
    clean = accuracy(model, x, y)
    assert clean >= 0.95, "the fixture model did not learn the task"
    assert accuracy(model, medium.x_adv, y) <= clean - 0.1
    assert accuracy(model, large.x_adv, y) <= 0.05


@over()
def test_zero_eps_changes_nothing(row, test_set):
    x, y = test_set
    assert torch.equal(row.run(row.model(), x, y, eps=0.0), x)


@over(lambda row: row.targeted)
def test_targeted_success_rises(row, test_set):
    x, y = test_set
    model, target = row.model(), (y + 1) % CLASSES
    x_adv = row.run(model, x, target, eps=2 * row.medium, targeted=True)
    before, after = accuracy(model, x, target), accuracy(model, x_adv, target)
    assert after >= before + 0.5


@over()
def test_model_state_is_left_as_found(row, test_set):
    """In train mode but its first BatchNorm in eval mode, its last parameter frozen, a .grad on its first:
    modes, requires_grad, .grad and every parameter and buffer (BatchNorm statistics) as found."""
    model = row.fresh_model().train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    params = list(model.parameters())
    params[-1].requires_grad_(False)
    sentinel = torch.full_like(params[0], 7.0)
    params[0].grad = sentinel
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    x, y = test_set
    row.run(model, x[:32], y[:32], eps=row.medium)  # 32 examples: the state does not depend on them
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert params[0].grad is sentinel and bool((sentinel == 7.0).all())
    assert all(p.grad is None for p in params[1:])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


# ensemble-only rows attack the Mixture in every property above already
@over(lambda row: not row.needs_mixture)
def test_mixture_is_attacked_like_any_model(row, test_set):
    x, y = test_set
    mixture = row.mixture()
    x_adv = row.run(mixture, x, y, eps=row.large)
    assert_in_threat_model(x_adv, x, row.budget(row.large), row.norm)
    assert accuracy(mixture, x, y) >= 0.95 and accuracy(mixture, x_adv, y) <= 0.05


# --- the template ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.05), (Norm.L2, 0.3)])
def test_pgd_is_not_weaker_than_fgsm(norm, eps, net, test_set):
    x, y = test_set
    fgsm_acc = accuracy(net, fgsm(net, x, y, eps=eps, norm=norm), y)
    pgd_acc = accuracy(net, pgd(net, x, y, eps=eps, alpha=eps / 4, steps=20, norm=norm,
                                generator=torch.Generator().manual_seed(0)), y)
    assert pgd_acc <= fgsm_acc + 0.02


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.05), (Norm.L2, 0.3)])
def test_restarts_are_never_worse_than_one_run_from_the_same_seed(norm, eps, net, test_set):
    x, y = test_set
    kwargs = dict(eps=eps, alpha=eps / 4, steps=2, norm=norm)  # weak, so that restarts matter
    one = pgd(net, x, y, **kwargs, generator=torch.Generator().manual_seed(5))
    many = pgd(net, x, y, **kwargs, restarts=8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits_one, logits_many = net(one), net(many)
    fooled_one, fooled_many = logits_one.argmax(1) != y, logits_many.argmax(1) != y
    assert bool((fooled_many | ~fooled_one).all())  # every example fooled once stays fooled
    assert int(fooled_many.sum()) > int(fooled_one.sum())
    loss = nn.functional.cross_entropy
    neither = ~fooled_one & ~fooled_many
    assert bool((loss(logits_many, y, reduction="none")[neither]
                 >= loss(logits_one, y, reduction="none")[neither] - 1e-6).all())
    assert_in_threat_model(many, x, eps, norm)


def test_random_start_is_reproducible_with_a_generator(net, test_set):
    x, y = test_set
    a, b, c = (pgd(net, x, y, eps=0.05, alpha=0.01, steps=2, generator=torch.Generator().manual_seed(s))
               for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_uses_eval_mode_so_batchnorm_statistics_are_not_updated(test_set):
    model = train_net(0).train()
    stats = model[1].running_mean.clone()
    x, y = test_set
    pgd(model, x, y, eps=0.05, alpha=0.01, steps=3)
    assert torch.equal(model[1].running_mean, stats)


def test_attacks_work_under_no_grad(net, test_set):
    x, y = test_set
    with torch.no_grad():
        x_adv = pgd(net, x, y, eps=0.05, alpha=0.0125, steps=10)
    assert accuracy(net, x_adv, y) <= accuracy(net, x, y) - 0.1


# --- bad arguments ----------------------------------------------------------------------------

def _x() -> torch.Tensor:
    return torch.rand(3, 1, SIZE, SIZE)


def _y() -> torch.Tensor:
    return torch.zeros(3, dtype=torch.long)


BAD_CALLS = [
    ("eps", lambda m: fgsm(m, _x(), _y(), eps=-0.1), r"eps must be .*>= 0, got -0.1"),
    ("eps-nan", lambda m: pgd(m, _x(), _y(), eps=math.nan, alpha=0.1, steps=1),
     r"eps must be a finite number >= 0, got nan"),
    ("alpha", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.0, steps=1),
     r"alpha must be .*> 0, got 0.0"),
    ("steps", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.1, steps=0),
     r"steps must be an integer >= 1, got 0"),
    ("steps-float", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.1, steps=2.5),
     r"steps must be an integer >= 1, got 2.5"),
    ("restarts", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.1, steps=1, restarts=0),
     r"restarts must be an integer >= 1, got 0"),
    ("norm", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.1, steps=1, norm="l1"),
     r"unknown norm 'l1'; allowed: \['linf', 'l2'\]"),
    ("loss", lambda m: pgd(m, _x(), _y(), eps=0.1, alpha=0.1, steps=1, loss="x"),
     r"unknown loss 'x'"),
    ("shape", lambda m: fgsm(m, _x(), torch.zeros(2, dtype=torch.long), eps=0.1),
     r"same number of examples, got x \(3, 1, 8, 8\) and y \(2,\)"),
    ("labels", lambda m: fgsm(m, _x(), torch.zeros(3), eps=0.1), r"y must be a 1-D integer tensor"),
    ("range", lambda m: fgsm(m, torch.full((3, 1, SIZE, SIZE), 1.5), _y(), eps=0.1),
     r"x must hold pixels in \[0, 1\], got values in \[1.5, 1.5\]"),
    ("int-x", lambda m: fgsm(m, torch.zeros(3, 1, 8, 8, dtype=torch.uint8), _y(), eps=0.1),
     r"x must be a floating-point tensor"),
]


@pytest.mark.parametrize("call,match", [(c, m) for _, c, m in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS])
def test_bad_arguments_raise_with_the_value_and_what_is_allowed(call, match, net):
    with pytest.raises(ValueError, match=match):
        call(net)


def test_arguments_are_keyword_only(net, test_set):
    x, y = test_set
    with pytest.raises(TypeError):
        fgsm(net, x, y, 0.1)  # type: ignore[misc]


# --- registry ---------------------------------------------------------------------------------

def test_registry_covers_every_name_and_the_report_protocol_uses_its_scripts_attacks():
    from phalanx.attacks import report_attacks

    assert set(ATTACKS) == set(AttackName)
    scripted = report_attacks(scripted=True)
    assert [(s.name, s.eps) for s in scripted] == [
        (AttackName.FGSM, 0.03), (AttackName.PGD_LINF_REPORT, 0.03), (AttackName.PGD_L2_REPORT, 0.03)]
    for spec in scripted[1:]:  # test_project.py: 5 iterations of 0.007, no random start
        assert (spec.resolved_params()["alpha"], spec.resolved_params()["steps"]) == (0.007, 5)
    assert scripted[2].resolved_params()["norm"] == "l2"
    stated = report_attacks(scripted=False)  # its text: projected PGD, 10 steps of 0.007 (the default)
    assert [(s.name, s.eps) for s in stated] == [
        (AttackName.FGSM, 0.03), (AttackName.PGD_LINF, 0.03), (AttackName.PGD_L2, 0.03)]
    for spec in stated[1:]:
        assert (spec.resolved_params()["alpha"], spec.resolved_params()["steps"]) == (0.007, 10)


def test_spec_coerces_names_and_rejects_unknown_names_and_parameters():
    assert AttackSpec("pgd-l2", 0.5).name is AttackName.PGD_L2
    with pytest.raises(ValueError, match=r"unknown attack 'cw'; allowed: \['fgsm', 'pgd-linf', 'pgd-l2', "):
        AttackSpec("cw", 0.1)
    allowed = r"attack 'fgsm' takes no parameter\(s\) \['alpha'\]; allowed: \['targeted'\]"
    with pytest.raises(ValueError, match=allowed):
        AttackSpec("fgsm", 0.1, {"alpha": 0.01})
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['norm'\]"):
        AttackSpec("pgd-linf", 0.1, {"norm": "l2"})
    with pytest.raises(ValueError, match=r"eps must be .*>= 0, got -1"):
        AttackSpec("fgsm", -1)


@pytest.mark.parametrize("name, params, loss", [
    ("fgsm", {}, "ce"), ("r-fgsm", {}, "ce"), ("pgd-linf", {}, "ce"), ("pgd-linf", {"loss": "cw"}, "cw"),
    ("pgd-cw", {}, "cw"), ("apgd-ce", {}, "ce"), ("apgd-dlr-l2", {}, "dlr"), ("apgd-t", {}, "dlr"),
    ("fab-t", {}, "cw"), ("square", {}, "cw"), ("sgm", {"loss": "cw"}, "cw"), ("pgd-linf-report", {}, "ce"),
])
def test_the_entry_states_the_loss_an_attack_ascends(name, params, loss):
    assert AttackSpec(name, 0.1, params).loss().value == loss


def test_the_entry_states_the_step_parameters_a_config_or_flag_may_set():
    assert ATTACKS[AttackName.FGSM].step_parameters() == frozenset()
    assert ATTACKS[AttackName.R_FGSM].step_parameters() == {"alpha"}  # its random step
    assert ATTACKS[AttackName.I_FGSM].step_parameters() == {"steps"}
    assert ATTACKS[AttackName.PGD_LINF].step_parameters() == {"alpha", "steps", "random_start", "restarts"}
    assert ATTACKS[AttackName.SQUARE].step_parameters() == {"restarts"}


def test_a_spec_drops_parameters_equal_to_the_defaults_and_round_trips_through_its_mapping():
    same = AttackSpec("pgd-linf", 0.1, {"steps": 10, "restarts": 1, "random_start": True})
    assert same == AttackSpec("pgd-linf", 0.1)
    explicit = AttackSpec("pgd-linf", 0.1, {"alpha": 0.025})  # a step eps scales stays explicit
    assert dict(explicit.params) == {"alpha": 0.025}
    for spec in (explicit, AttackSpec("r-fgsm", 0.1, {"alpha": 0.02}), AttackSpec("fgsm", 0.1),
                 AttackSpec("apgd-ce", 0.1, {"steps": 20, "restarts": 2, "random_start": False})):
        assert AttackSpec.from_mapping(spec.to_mapping()) == spec
    assert AttackSpec("pgd-linf", 0.1, {"loss": "cw"}).to_mapping()["loss"] == "cw"  # written, not lost


@pytest.mark.parametrize("spec", [AttackSpec("fgsm", 0.05), AttackSpec("pgd-linf", 0.05, {"steps": 3}),
                                  AttackSpec("pgd-l2", 0.3, {"alpha": 0.1, "steps": 3, "restarts": 2})],
                         ids=lambda s: s.name.value)
def test_run_attack_equals_the_direct_call_and_batches_stay_in_the_ball(spec, net, test_set):
    x, y = test_set
    direct = ATTACKS[spec.name].fn
    kwargs = spec.resolved_params()
    if spec.name is not AttackName.FGSM:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    expected = direct(net, x, y, eps=spec.eps, **kwargs)
    assert torch.equal(run_attack(spec, net, x, y, torch.Generator().manual_seed(0)), expected)
    batched = attack_in_batches(spec, net, x, y, 100, generator=torch.Generator().manual_seed(0))
    assert batched.device == x.device
    assert_in_threat_model(batched, x, spec.eps, Norm(spec.resolved_params()["norm"]))
    if spec.name is AttackName.FGSM:  # deterministic per example
        assert torch.equal(batched, expected)


def test_attack_in_batches_rejects_a_bad_batch_size(net, test_set):
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        attack_in_batches(AttackSpec(AttackName.FGSM, 0.03), net, *test_set, 0)


# --- property -----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), channels=st.integers(1, 3), size=st.integers(1, 5),
       eps=st.floats(0.0, 1.0), steps=st.integers(1, 3), norm=st.sampled_from(list(Norm)),
       random_start=st.booleans(), seed=st.integers(0, 2**16))
def test_any_shape_stays_in_the_threat_model(batch, channels, size, eps, steps, norm, random_start, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g)
    x[0].view(-1)[0] = 1.0  # a pixel at the edge of the range
    y = torch.randint(0, 3, (batch,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 3))
    x_before = x.clone()
    for x_adv in (fgsm(model, x, y, eps=eps, norm=norm),
                  pgd(model, x, y, eps=eps, alpha=max(eps, 0.01) / 2, steps=steps, norm=norm,
                      random_start=random_start, generator=g)):
        assert_in_threat_model(x_adv, x, eps, norm)
    assert torch.equal(x, x_before)
