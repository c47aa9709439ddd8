"""A Mixture whose members run stacked (models/mixture.py): the same numbers as one call per member,
and still an ordinary nn.Module (state_dict, modes, weight changes, attacks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phalanx.attacks import pgd
from phalanx.models import Classifier, InputSpec, Mixture, build_model

SPEC = InputSpec(channels=3, size=16, num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
ARCHS = ["conv", "conv3", "resnet20"]  # resnet20: BatchNorm


def _members(arch: str, n: int = 3, dtype: torch.dtype = torch.float64) -> list[Classifier]:
    torch.manual_seed(0)
    members = [build_model(arch, SPEC).to(dtype).eval() for _ in range(n)]
    with torch.no_grad():  # BatchNorm statistics and affine parameters that differ per member
        for m in members:
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
    return members


def _batch(n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float64
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(10, (n,), generator=g)


def _logits_and_input_grad(mix: Mixture, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Member logits, mixture output, and the input gradient of a loss that uses both."""
    x = x.clone().requires_grad_(True)
    member_logits, out = mix.member_logits(x), mix(x)
    loss = F.nll_loss(out, y) + (member_logits ** 2).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return member_logits.detach(), out.detach(), grad


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_equals_one_call_per_member_in_eval_mode(arch):
    members = _members(arch)
    stacked, separate = Mixture(members, stacked=True), Mixture(members, stacked=False)
    assert stacked.runs_stacked() and not separate.runs_stacked()
    x, y = _batch()
    for got, want in zip(_logits_and_input_grad(stacked, x, y), _logits_and_input_grad(separate, x, y)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["conv", "resnet20"])
def test_stacked_equals_one_call_per_member_in_train_mode(arch):
    """Gradients reach every member's parameters; BatchNorm uses and updates each member's statistics."""
    members = [m.train() for m in _members(arch)]
    reference = copy.deepcopy(members)
    x, y = _batch()
    for mix in (Mixture(members, stacked=True), Mixture(reference, stacked=False)):
        F.nll_loss(mix(x), y).backward()
    for m, r in zip(members, reference):
        for (name, p), q in zip(m.named_parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(m.named_buffers(), r.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_auto_stacks_only_architectures_that_prefer_it_and_members_in_one_mode():
    conv = Mixture(_members("conv"))
    assert conv.runs_stacked()  # SeedConv.prefers_stacking
    assert not Mixture(_members("resnet20")).runs_stacked()  # grouped 3x3 kernels are slower on CPU
    assert not Mixture(_members("conv", n=1)).runs_stacked()
    conv.members[0].train()  # a mix of modes: one call each, the same numbers
    assert not conv.runs_stacked()
    x, y = _batch()
    for got, want in zip(_logits_and_input_grad(conv, x, y),
                         _logits_and_input_grad(Mixture(list(conv.members), stacked=False), x, y)):
        torch.testing.assert_close(got, want)


def test_a_weight_change_is_seen_by_the_next_call():
    members = _members("conv")
    mix = Mixture(members, stacked=True)
    x, y = _batch()
    before = mix.member_logits(x)
    optimizer = torch.optim.SGD(mix.parameters(), lr=0.5)
    F.nll_loss(mix(x), y).backward()
    optimizer.step()
    after = mix.member_logits(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, Mixture(members, stacked=False).member_logits(x))
    with torch.no_grad():  # also while frozen, as inside an attack
        for p in mix.parameters():
            p.requires_grad_(False)
        members[1].stages["logits"].bias.add_(1.0)
        torch.testing.assert_close(mix.member_logits(x)[1], after[1] + 1.0)
        mix.load_state_dict(Mixture(_members("conv")).state_dict())  # a checkpoint, copied in place
        fresh = Mixture(_members("conv"), stacked=False)
        torch.testing.assert_close(mix.member_logits(x), fresh.member_logits(x))


def test_a_replaced_or_cast_member_is_seen():
    members = _members("conv", dtype=torch.float32)
    mix = Mixture(members, stacked=True)
    x, _ = _batch(dtype=torch.float32)
    mix.member_logits(x)
    mix.members[2] = copy.deepcopy(members[0])
    torch.testing.assert_close(mix.member_logits(x)[2], mix.member_logits(x)[0])
    mix.double()  # cast after a stacked call: the stack is rebuilt for the new dtype
    x64 = x.double()
    separate = Mixture(list(mix.members), stacked=False)
    torch.testing.assert_close(mix.member_logits(x64), separate.member_logits(x64))


@pytest.mark.parametrize("arch", ["conv", "resnet20"])
def test_state_dict_is_the_members_own(arch):
    stacked = Mixture(_members(arch), stacked=True)
    keys = list(Mixture(_members(arch), stacked=False).state_dict())
    assert list(stacked.state_dict()) == keys
    stacked(_batch()[0])
    assert list(stacked.state_dict()) == keys  # nothing registered by the stacked call
    assert sum(1 for _ in stacked.parameters()) == sum(1 for m in stacked.members for _ in m.parameters())
    assert sum(1 for _ in stacked.buffers()) == sum(1 for m in stacked.members for _ in m.buffers())


@pytest.mark.parametrize("arch", ["conv", "resnet20"])
def test_an_attack_leaves_modes_and_grads_as_found_and_matches_the_per_member_path(arch):
    members = _members(arch)
    mix = Mixture(members, stacked=True).train()
    grads = {}
    for i, p in enumerate(mix.parameters()):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
        grads[p] = p.grad
    members[1].requires_grad_(False)
    flags = {p: p.requires_grad for p in mix.parameters()}
    modes = [m.training for m in mix.modules()]
    x, y = _batch()
    adv = pgd(mix, x, y, eps=8 / 255, alpha=2 / 255, steps=5, generator=torch.Generator().manual_seed(0))
    assert [m.training for m in mix.modules()] == modes
    assert all(p.grad is grads[p] and p.requires_grad == flags[p] for p in mix.parameters())
    reference = pgd(Mixture(members, stacked=False).train(), x, y, eps=8 / 255, alpha=2 / 255, steps=5,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adv, reference)  # the attack ran in eval mode both ways
    assert (adv - x).abs().max() <= 8 / 255 + 1e-12


def test_bad_stacked_arguments():
    with pytest.raises(ValueError, match="cannot be stacked"):
        Mixture([build_model("conv", SPEC), build_model("conv3", SPEC)], stacked=True)
    with pytest.raises(ValueError, match="cannot be stacked"):
        Mixture(_members("conv", n=1), stacked=True)
    with pytest.raises(ValueError, match="stacked must be None"):
        Mixture(_members("conv"), stacked="yes")
    with pytest.raises(ValueError, match="stacked must be None"):
        Mixture(_members("conv"), stacked=1)
    mix = Mixture(_members("conv"), stacked=True)
    mix.members[0] = build_model("conv3", SPEC).double()
    with pytest.raises(ValueError, match="replaced since construction"):
        mix(_batch()[0])
    assert Mixture([build_model("conv", SPEC), build_model("conv3", SPEC)], stacked=False)(
        _batch(dtype=torch.float32)[0]).shape == (6, 10)
