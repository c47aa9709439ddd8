"""DVERGE: layer draws, the loss's gradient flow, fast == plain, and a short real training run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phalanx.attacks.distillation import DistillConfig, distill_with
from phalanx.models import InputSpec, build_model
from phalanx.train.api import Batch
from phalanx.train.dverge import Dverge, DvergeConfig, draw_layers
from benchmarks.dverge_reference import dverge_plain_step, plain_distill

SPEC16 = InputSpec(channels=3, size=16, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)


def _members(arch: str, n: int = 3, spec: InputSpec = SPEC16, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return [build_model(arch, spec).to(dtype).train() for _ in range(n)]


def _batch(b: int = 8, spec: InputSpec = SPEC16, seed: int = 1, dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = (b, spec.channels, spec.size, spec.size)
    return Batch(torch.rand(shape, generator=g, dtype=dtype), torch.randint(10, (b,), generator=g),
                 torch.rand(shape, generator=g, dtype=dtype), torch.randint(10, (b,), generator=g))


def test_layer_drawn_every_epoch_from_rng():
    members = _members("conv")
    method = Dverge(DvergeConfig())
    rng = torch.Generator().manual_seed(0)
    draws = [method.start_epoch(e, members, rng)["layer"] for e in range(60)]
    assert set(draws) == set(members[0].layer_names)  # all five taps, logits included, occur
    assert len({tuple(draws[i:i + 5]) for i in range(0, 60, 5)}) > 1  # not one fixed pattern
    again = Dverge(DvergeConfig())
    rng = torch.Generator().manual_seed(0)
    assert [again.start_epoch(e, members, rng)["layer"] for e in range(60)] == draws


def test_fixed_and_restricted_layers():
    members = _members("conv")
    rng = torch.Generator().manual_seed(0)
    assert draw_layers(members, DvergeConfig(fixed_layer="fc1"), rng) == ["fc1"] * 3
    drawn = {draw_layers(members, DvergeConfig(layers=("conv1", "fc2")), rng)[0] for _ in range(30)}
    assert drawn == {"conv1", "fc2"}
    with pytest.raises(ValueError, match="not a layer"):
        draw_layers(members, DvergeConfig(fixed_layer="nope"), rng)


def test_mixed_architectures_draw_each_members_own_layer():
    spec = InputSpec(3, 16, 10, (0.5,) * 3, (0.25,) * 3)
    members = [build_model("conv", spec), build_model("conv3", spec)]
    rng = torch.Generator().manual_seed(0)
    method = Dverge(DvergeConfig(distill=DistillConfig(steps=2)))
    method.start_epoch(0, members, rng)
    out = method.loss(members, _batch(4, spec), rng)
    out.loss.backward()
    assert len(out.member_losses.tolist()) == 2 and torch.isfinite(out.loss)
    assert all(p.grad is not None for m in members for p in m.parameters())


def test_member_gets_gradient_only_from_its_own_term():
    members = _members("conv")
    method = Dverge(DvergeConfig(fixed_layer="conv2", distill=DistillConfig(steps=3)))
    out = method.loss(members, _batch(), torch.Generator().manual_seed(0))
    assert all(p.grad is None for m in members for p in m.parameters())  # distillation left .grad alone
    # Rebuild member 0's term alone and backpropagate it: only member 0 receives gradient.
    batch = _batch()
    rng = torch.Generator().manual_seed(0)
    xs = [distill_with(m, batch.x_source, batch.x, layer="conv2", config=method.cfg.distill, generator=rng)
          for m in members]
    term0 = sum(F.cross_entropy(members[0](xs[j]), batch.y_source) for j in (1, 2))
    assert float(term0.detach()) == pytest.approx(out.member_losses.tolist()[0], rel=1e-5)
    term0.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in members[0].parameters())
    assert all(p.grad is None for m in members[1:] for p in m.parameters())


@pytest.mark.parametrize("arch,layer,stacking", [
    ("conv", "fc1", "auto"), ("conv", "logits", "auto"), ("conv", "conv1", "never"),
    ("resnet20", "s2b1.mid", "auto"), ("resnet20", "s3b3.out", "always"),
])
def test_fast_equals_plain(arch, layer, stacking):
    """Same distilled examples and the same SGD update as the authors-style plain loop (float64),
    with the members run stacked (the seed Conv's default; ResNet's train-mode BatchNorm) or not."""
    spec = SPEC16 if arch == "conv" else InputSpec(3, 8, 10, (0.5,) * 3, (0.25,) * 3)
    cfg = DvergeConfig(fixed_layer=layer, distill=DistillConfig(steps=4, random_start=True), stack_members=stacking)
    plain = _members(arch, spec=spec, dtype=torch.float64)
    fast = copy.deepcopy(plain)
    batch = _batch(6, spec, dtype=torch.float64)

    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in plain]
    plain_losses = dverge_plain_step(plain, opts, batch.x, batch.x_source, batch.y_source, layers=[layer] * 3,
                                     cfg=cfg.distill, generator=torch.Generator().manual_seed(5))

    method = Dverge(cfg)
    opt = torch.optim.SGD([p for m in fast for p in m.parameters()], lr=0.1)
    out = method.loss(fast, batch, torch.Generator().manual_seed(5))
    opt.zero_grad()
    out.loss.backward()
    opt.step()

    assert out.member_losses.tolist() == pytest.approx(plain_losses, rel=1e-9)
    assert (method._stack is not None) == (stacking == "always" or (arch == "conv" and stacking == "auto"))
    for mp, mf in zip(plain, fast):
        for (name, pp), pf in zip(mp.named_parameters(), mf.parameters()):
            torch.testing.assert_close(pf, pp, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("arch,layer", [("conv", "conv2"), ("resnet20", "s2b2.mid")])
@pytest.mark.parametrize("plus_adv,clean_weight", [(False, 0.0), (True, 0.0), (False, 0.5)],
                         ids=["dverge", "dverge-advt", "with-clean-term"])
def test_stacked_equals_member_by_member(arch, layer, plus_adv, clean_weight):
    """The same losses, update and (ResNet-20 in train mode) BatchNorm running statistics (float64)."""
    spec = SPEC16 if arch == "conv" else InputSpec(3, 8, 10, (0.5,) * 3, (0.25,) * 3)
    runs = {}
    for stacking in ("always", "never"):
        members = _members(arch, spec=spec, dtype=torch.float64)
        cfg = DvergeConfig(fixed_layer=layer, plus_adv=plus_adv, adv_steps=2, clean_weight=clean_weight,
                           stack_members=stacking, distill=DistillConfig(steps=3))
        opt = torch.optim.SGD([p for m in members for p in m.parameters()], lr=0.1)
        out = Dverge(cfg).loss(members, _batch(6, spec, dtype=torch.float64), torch.Generator().manual_seed(2))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        runs[stacking] = (out.member_losses.tolist(), [m.state_dict() for m in members])
    assert runs["always"][0] == pytest.approx(runs["never"][0], rel=1e-9)
    for a, b in zip(runs["always"][1], runs["never"][1]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-10, rtol=0, msg=key)


def test_stacking_always_refuses_members_that_cannot_stack():
    spec = InputSpec(3, 16, 10, (0.5,) * 3, (0.25,) * 3)
    members = [build_model("conv", spec), build_model("conv3", spec)]
    method = Dverge(DvergeConfig(fixed_layer="logits", stack_members="always", distill=DistillConfig(steps=1)))
    with pytest.raises(ValueError, match="cannot be stacked.*ConvNet, SeedConv.*auto or never"):
        method.loss(members, _batch(4, spec), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stack_members must be auto, always or never"):
        DvergeConfig(stack_members="yes")


def test_fast_distillation_equals_plain_distillation():
    (m,) = _members("conv", n=1, dtype=torch.float64)
    batch = _batch(6, dtype=torch.float64)
    cfg = DistillConfig(steps=6)
    a = plain_distill(m, batch.x_source, batch.x, layer="conv2", cfg=cfg)
    b = distill_with(m, batch.x_source, batch.x, layer="conv2", config=cfg)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_plus_adv_adds_the_adversarial_term():
    pytest.importorskip("phalanx.attacks.pgd")
    members = _members("conv", n=2)
    cfg = DvergeConfig(fixed_layer="fc2", plus_adv=True, coeff=0.5, adv_steps=2,
                       distill=DistillConfig(steps=2))
    out = Dverge(cfg).loss(members, _batch(), torch.Generator().manual_seed(0))
    plain = Dverge(DvergeConfig(fixed_layer="fc2", distill=DistillConfig(steps=2)))
    div = plain.loss(members, _batch(), torch.Generator().manual_seed(0))
    # loss_i = coeff * div_i + CE(f_i(PGD_i(x_s)), y_s) with a non-negative CE
    assert all(a >= 0.5 * d - 1e-6 for a, d in zip(out.member_losses.tolist(), div.member_losses.tolist()))
    assert float(out.extras["diversity_loss"]) == pytest.approx(float(div.extras["diversity_loss"]), rel=1e-5)


def test_stacked_adversarial_examples_carry_the_attack_post_condition(monkeypatch):
    """The stacked PGD of DVERGE+AdvT is checked like every registered attack: an iterate that
    leaves the eps-ball (a broken projection) stops training with an AssertionError."""
    import phalanx.attacks.core as core

    real = core.iterate

    def leaky(model, x, y, x_start, *, eps, **kw):
        return (real(model, x, y, x_start, eps=eps, **kw) + 2 * eps).clamp(0, 1)

    members = _members("conv", n=2)
    cfg = DvergeConfig(fixed_layer="fc2", plus_adv=True, adv_steps=2, stack_members="always",
                       distill=DistillConfig(steps=1))
    Dverge(cfg).loss(members, _batch(), torch.Generator().manual_seed(0))  # the real iterate passes
    monkeypatch.setattr(core, "iterate", leaky)
    with pytest.raises(AssertionError, match="stacked PGD.*left its threat model"):
        Dverge(cfg).loss(members, _batch(), torch.Generator().manual_seed(0))


def test_clean_weight_adds_report_eq4_clean_term():
    """loss_i = coeff * sum_j CE(f_i(x'_j), y_s) + clean_weight * CE(f_i(x), y)  (report eq. 4)."""
    members = _members("conv")
    batch = _batch()
    base = Dverge(DvergeConfig(fixed_layer="fc1", distill=DistillConfig(steps=2)))
    plain = base.loss(members, batch, torch.Generator().manual_seed(0))
    both = Dverge(DvergeConfig(fixed_layer="fc1", distill=DistillConfig(steps=2), coeff=0.5, clean_weight=2.0))
    out = both.loss(members, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = [float(F.cross_entropy(m(batch.x), batch.y)) for m in members]
    expected = [0.5 * d + 2.0 * c for d, c in zip(plain.member_losses.tolist(), clean)]
    assert out.member_losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert float(out.extras["clean_loss"]) == pytest.approx(sum(clean) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="clean_weight"):
        DvergeConfig(clean_weight=-1.0)


def test_bad_config_and_missing_source_batch():
    with pytest.raises(ValueError, match="coeff"):
        DvergeConfig(coeff=-1.0)
    with pytest.raises(ValueError, match="fixed_layer"):
        DvergeConfig(layers=("conv1",), fixed_layer="fc1")
    method = Dverge(DvergeConfig(fixed_layer="fc1"))
    b = _batch()
    with pytest.raises(ValueError, match="source batch"):
        method.loss(_members("conv"), Batch(b.x, b.y), torch.Generator())


@pytest.mark.slow
def test_training_on_digits_lowers_within_ensemble_transferability():
    """3 seed-Conv members on sklearn digits (16x16): 300 baseline steps, then 300 DVERGE steps.

    The members' accuracy on PGD examples crafted on another member (the off-diagonal of the
    transferability matrix) must rise, i.e. transfer less, while clean accuracy stays high.
    """
    datasets = pytest.importorskip("sklearn.datasets")
    from phalanx.attacks.diversity import transferability_matrix

    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:1600]
    spec = InputSpec(1, 16, 10, (float(x.mean()),), (float(x.std()),))
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model("conv", spec))
    params = [p for m in members for p in m.parameters()]

    def draws(seed: int, n: int):
        g = torch.Generator().manual_seed(seed)
        return [train[torch.randint(len(train), (64,), generator=g)] for _ in range(n)]

    opt = torch.optim.Adam(params, lr=3e-3)
    for idx in draws(1, 300):
        loss = sum(F.cross_entropy(m(x[idx]), y[idx]) for m in members)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def off_diagonal_transfer_accuracy() -> float:
        t = transferability_matrix(members, x[test], y[test], eps=0.1, alpha=0.025, steps=10,
                                   generator=torch.Generator().manual_seed(0))
        return sum(t[i][j] for i in range(3) for j in range(3) if i != j) / 6

    before = off_diagonal_transfer_accuracy()
    method = Dverge(DvergeConfig(distill=DistillConfig(eps=0.1, step_size=0.01, steps=10)))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    rng = torch.Generator().manual_seed(0)
    for k, (ti, si) in enumerate(zip(draws(2, 300), draws(3, 300))):
        if k % 50 == 0:
            method.start_epoch(k // 50, members, rng)
        out = method.loss(members, Batch(x[ti], y[ti], x[si], y[si]), rng)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = off_diagonal_transfer_accuracy()
    with torch.no_grad():
        clean = [float((m.eval()(x[test]).argmax(1) == y[test]).float().mean()) for m in members]
    assert after > before + 0.03, (before, after)
    assert min(clean) > 0.85, clean


def test_diagnostics_are_json_ready_matrices():
    members = _members("conv", n=2)
    method = Dverge(DvergeConfig(fixed_layer="fc1", distill=DistillConfig(steps=2)))
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(10, (20,), generator=g)
    state = g.get_state()
    diag = method.diagnostics(members, x_u8, y, g)
    assert torch.equal(g.get_state(), state)  # the training stream is not consumed
    for key in ("transferability", "vulnerability_diversity"):
        matrix = diag[key]
        assert len(matrix) == 2 and all(len(r) == 2 and all(isinstance(v, float) for v in r) for r in matrix)
    assert all(m.training for m in members)
