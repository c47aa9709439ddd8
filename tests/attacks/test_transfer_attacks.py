"""M-DI²-FGSM and SGM (transfer_attacks.py) on tiny ResNets trained on 4 classes of noisy 8x8 prototypes."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

from phalanx.attacks import (
    AttackName,
    AttackSpec,
    Loss,
    Norm,
    attack_mode,
    input_diversity,
    input_gradient,
    mdi2fgsm,
    mifgsm,
    pgd,
    run_attack,
    sgm,
    skip_gradient,
)
from phalanx.models import InputSpec, Mixture, ResNet
from phalanx.models.resnet import BasicBlock

CLASSES, SIZE = 4, 8
SPEC = InputSpec(1, SIZE, CLASSES, (0.5,), (0.25,))


def make_task(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    signs = 2 * torch.randint(0, 2, (CLASSES, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(3)) - 1
    protos = 0.5 + 0.08 * signs
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return (protos[y] + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1), y


@functools.cache
def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = ResNet(SPEC, depth=8)
    x, y = make_task(seed + 100, 1024)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def resnet(seed: int = 0) -> ResNet:
    """A ResNet-8 trained from `seed` (once per seed), in eval mode."""
    model = ResNet(SPEC, depth=8)
    model.load_state_dict(_state(seed))
    return model.eval()


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * SIZE * SIZE, CLASSES))


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor]:
    return make_task(1, 64)


@torch.no_grad()
def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
               for m in model.modules())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- input diversity ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, 32])
def test_input_diversity_keeps_the_shape_and_is_the_identity_with_p_0(size):
    x = torch.rand(3, 2, size, size, generator=seeded(0))
    assert input_diversity(x, p=0.0, resize_rate=1.1, generator=seeded(0)) is x
    outs = [input_diversity(x, p=1.0, resize_rate=1.1, generator=seeded(s)) for s in range(4)]
    for out in outs:
        assert out.shape == x.shape and not torch.equal(out, x)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # the zero padding reaches the image: an all-white batch comes back darker at one edge
    white = input_diversity(torch.ones(1, 1, size, size), p=1.0, resize_rate=1.1, generator=seeded(0))
    assert float(white.min()) < 1.0
    assert torch.equal(outs[0], input_diversity(x, p=1.0, resize_rate=1.1, generator=seeded(0)))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_input_diversity_transforms_with_probability_p():
    x = torch.rand(1, 1, 32, 32, generator=seeded(0))
    g = seeded(0)
    changed = sum(not torch.equal(input_diversity(x, p=0.5, resize_rate=1.1, generator=g), x)
                  for _ in range(400))
    assert 160 <= changed <= 240  # Binomial(400, 0.5): mean 200, sd 10


# --- M-DI²-FGSM ----------------------------------------------------------------------------------

def test_mdi2fgsm_with_p_0_is_mifgsm_with_the_same_steps(task):
    """Without the transform, Xie et al.'s M-DI²-FGSM is Dong et al.'s MI-FGSM; with it, it is not."""
    model, (x, y) = resnet(), task
    eps, k = 0.05, 4
    expected = mifgsm(model, x, y, eps=eps, steps=k, mu=1.0)
    assert torch.equal(mdi2fgsm(model, x, y, eps=eps, alpha=eps / k, steps=k, mu=1.0, p=0.0), expected)
    diverse = mdi2fgsm(model, x, y, eps=eps, alpha=eps / k, steps=k, mu=1.0, p=1.0, generator=seeded(0))
    assert not torch.equal(diverse, expected)


def test_mdi2fgsm_is_reproducible_from_its_generator(task):
    model, (x, y) = resnet(), task
    runs = [mdi2fgsm(model, x, y, eps=0.05, steps=5, generator=seeded(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_mdi2fgsm_works_on_a_model_of_fixed_input_size(task):
    """The transformed batch is resized back, so a flatten-and-linear model accepts it."""
    x, y = task
    x_adv = mdi2fgsm(conv_net(), x, y, eps=0.05, steps=3, p=1.0, generator=seeded(0))
    assert x_adv.shape == x.shape


# --- SGM --------------------------------------------------------------------------------------------

def _one_block_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BasicBlock(4, 4, 1, "relu"), nn.Flatten(),
                         nn.Linear(4 * SIZE * SIZE, CLASSES)).eval()


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    decay = skip_gradient(model, gamma) if gamma is not None else contextlib.nullcontext()
    with attack_mode(model), decay:
        return input_gradient(model, x, y, loss=Loss.CE, targeted=False)


def _detached_residual_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The input gradient of a forward whose residual branches are detached: only skips carry gradient."""
    handles = [m.bn2.register_forward_hook(lambda mod, i, out: out.detach())
               for m in model.modules() if isinstance(m, BasicBlock)]
    try:
        return _grad(model, x, y)
    finally:
        for h in handles:
            h.remove()


def test_skip_gradient_decays_only_the_residual_branch(task):
    """One block: d loss / d x = skip part + gamma * residual part, linear in gamma; gamma = 0 leaves the
    gradient of the residual-detached network, gamma = 1 the true gradient (Wu et al. 2020, section 3)."""
    model, (x, y) = _one_block_net(), task
    g0, g_half, g1 = (_grad(model, x, y, gamma) for gamma in (0.0, 0.5, 1.0))
    assert torch.equal(g1, _grad(model, x, y))
    assert torch.allclose(g0, _detached_residual_grad(model, x, y), atol=1e-7)
    assert torch.allclose(g_half, (g0 + g1) / 2, atol=1e-7)
    assert not torch.allclose(g0, g1, atol=1e-4)
    assert no_hooks(model)


def test_sgm_hooks_change_the_gradient_of_a_resnet_and_are_removed(task):
    model, (x, y) = resnet(), task
    plain = _grad(model, x, y)
    assert not torch.allclose(_grad(model, x, y, 0.2), plain, atol=1e-4)
    assert no_hooks(model)
    assert torch.equal(_grad(model, x, y), plain)
    with pytest.raises(KeyError), skip_gradient(model, 0.2):
        raise KeyError("boom")
    assert no_hooks(model)


def test_sgm_hooks_every_member_of_a_stacked_mixture(task):
    x, y = task
    mixture = Mixture([resnet(0), resnet(1)], stacked=True)  # its stacked copy would bypass member hooks
    unstacked = Mixture([resnet(0), resnet(1)], stacked=False)
    assert torch.allclose(_grad(mixture, x, y, 0.0), _detached_residual_grad(unstacked, x, y), atol=1e-7)
    assert mixture.stacked is True and no_hooks(mixture)
    with pytest.raises(KeyError), skip_gradient(mixture, 0.2):
        assert mixture.stacked is False
        raise KeyError("boom")
    assert mixture.stacked is True and no_hooks(mixture)
    assert torch.equal(sgm(mixture, x, y, eps=0.05, steps=3), sgm(unstacked, x, y, eps=0.05, steps=3))


def test_sgm_with_gamma_1_is_the_plain_attack_it_builds_on(task):
    model, (x, y) = resnet(), task
    eps, alpha, k = 0.05, 0.01, 5
    assert torch.equal(sgm(model, x, y, eps=eps, alpha=alpha, steps=k, gamma=1.0),
                       pgd(model, x, y, eps=eps, alpha=alpha, steps=k, random_start=False))
    assert torch.equal(sgm(model, x, y, eps=eps, alpha=alpha, steps=k, gamma=1.0, mu=1.0),
                       mdi2fgsm(model, x, y, eps=eps, alpha=alpha, steps=k, mu=1.0, p=0.0))
    assert not torch.equal(sgm(model, x, y, eps=eps, alpha=alpha, steps=k, gamma=0.2),
                           sgm(model, x, y, eps=eps, alpha=alpha, steps=k, gamma=1.0))


def test_sgm_refuses_a_model_without_residual_blocks(task):
    x, y = task
    model = conv_net()
    with pytest.raises(ValueError, match=r"SGM needs a ResNet surrogate .*; Sequential has none"):
        sgm(model, x, y, eps=0.05, steps=2)
    with pytest.raises(ValueError, match="SGM needs a ResNet surrogate"):
        run_attack(AttackSpec("sgm", 0.05), Mixture([model]), x, y)
    assert no_hooks(model)


# --- both: threat model, state, registry, bad arguments -------------------------------------------

CALLS = {
    "m-di2-fgsm": lambda m, x, y, eps: mdi2fgsm(m, x, y, eps=eps, steps=5, generator=seeded(0)),
    "sgm": lambda m, x, y, eps: sgm(m, x, y, eps=eps, steps=5),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_in_the_threat_model_and_the_model_left_as_found(name, task):
    x, y = task
    x[0, 0, 0, 0] = 1.0  # a pixel at the edge of the range
    x_before = x.clone()
    model = resnet().train()
    model.blocks["s1b1"].bn1.eval()
    model.fc.bias.requires_grad_(False)
    sentinel = torch.ones_like(model.fc.weight)
    model.fc.weight.grad = sentinel
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    stats = model.blocks["s1b1"].bn2.running_mean.clone()
    for eps in (0.0, 0.03, 0.3):
        x_adv = CALLS[name](model, x, y, eps)
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert float((x_adv - x).abs().max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert torch.equal(x, x_before)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.fc.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert torch.equal(model.blocks["s1b1"].bn2.running_mean, stats)
    assert no_hooks(model)


@pytest.mark.parametrize("name", [AttackName.M_DI2_FGSM, AttackName.SGM], ids=lambda n: n.value)
def test_registered_attacks_run_by_name_and_fool_a_trained_ensemble(name, task):
    x, y = task
    ensemble = Mixture([resnet(0), resnet(1)])
    assert acc(ensemble, x, y) >= 0.95
    spec = AttackSpec(name, 0.1, {"steps": 10})
    x_adv = run_attack(spec, ensemble, x, y, seeded(0))
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert acc(ensemble, x_adv, y) <= 0.3
    assert acc(resnet(0), x_adv, y) <= 0.3  # and each member it was crafted on


def test_registry_defaults_are_the_dverge_authors():
    params = AttackSpec("m-di2-fgsm", 0.05).resolved_params()
    assert params == {"alpha": pytest.approx(0.01), "steps": 100, "mu": 1.0, "p": 0.5, "resize_rate": 1.1,
                      "norm": "linf", "loss": "ce", "targeted": False}
    params = AttackSpec("sgm", 0.05).resolved_params()
    assert params == {"alpha": pytest.approx(0.01), "steps": 100, "gamma": 0.2, "mu": 0.0, "norm": "linf",
                      "loss": "ce", "targeted": False}
    assert AttackSpec("sgm", 0.05, {"alpha": 0.002}).resolved_params()["alpha"] == 0.002
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['norm'\]"):
        AttackSpec("sgm", 0.05, {"norm": Norm.L2})


def test_cw_loss_runs(task):
    x, y = task
    model = resnet()
    for call in (lambda: mdi2fgsm(model, x, y, eps=0.1, steps=10, loss="cw", generator=seeded(0)),
                 lambda: sgm(model, x, y, eps=0.1, steps=10, loss="cw")):
        assert acc(model, call(), y) <= 0.3


BAD = [
    (lambda m, x, y: mdi2fgsm(m, x, y, eps=0.1, p=1.5), r"p must be a number in \[0, 1\], got 1.5"),
    (lambda m, x, y: mdi2fgsm(m, x, y, eps=0.1, resize_rate=0.9), r"resize_rate must be .*, got 0.9"),
    (lambda m, x, y: mdi2fgsm(m, x, y, eps=0.1, mu=-1.0), r"mu must be a finite number >= 0, got -1.0"),
    (lambda m, x, y: mdi2fgsm(m, x[..., :7], y, eps=0.1), r"square images .* got shape \(4, 1, 8, 7\)"),
    (lambda m, x, y: sgm(m, x, y, eps=0.1, gamma=-0.1), r"gamma must be a number in \[0, 1\], got -0.1"),
    (lambda m, x, y: sgm(m, x, y, eps=0.1, steps=0), r"steps must be an integer >= 1, got 0"),
    (lambda m, x, y: sgm(m, x, y, eps=0.1, loss="hinge"), r"unknown loss 'hinge'"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_name_the_value(call, match, task):
    x, y = task
    with pytest.raises(ValueError, match=match):
        call(resnet(), x[:4], y[:4])
