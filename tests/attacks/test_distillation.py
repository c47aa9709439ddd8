"""Feature distillation (report eq. 1): threat model, progress toward the target, model state, update rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from phalanx.attacks.distillation import DistillConfig, distill, distill_stacked, distill_with, signed_descent
from phalanx.models import Classifier, InputSpec, build_model
from phalanx.models.stacked import stack_members

SPEC = InputSpec(channels=3, size=16, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return build_model("conv", SPEC).eval()


def _images(seed: int, b: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _feature_mse(model: Classifier, x: torch.Tensor, target: torch.Tensor, layer: str) -> torch.Tensor:
    with torch.no_grad():
        return (model.features(x, layer) - model.features(target, layer)).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc1", "fc2", "logits"])
@pytest.mark.parametrize("random_start", [False, True])
def test_stays_in_ball_and_moves_features_toward_target(model, layer, random_start):
    xs, xt = _images(1), _images(2)
    cfg = DistillConfig(eps=8 / 255, step_size=2 / 255, steps=10, random_start=random_start)
    x_d = distill_with(model, xs, xt, layer=layer, config=cfg, generator=torch.Generator().manual_seed(3))
    assert x_d.shape == xs.shape
    assert (x_d - xs).abs().max() <= 8 / 255 + 1e-6
    assert x_d.min() >= 0 and x_d.max() <= 1
    before, after = _feature_mse(model, xs, xt, layer), _feature_mse(model, x_d, xt, layer)
    assert (after < before).all()


def test_pixels_at_the_range_edges_stay_in_range(model):
    xs = (_images(1) > 0.5).float()  # only 0s and 1s
    x_d = distill(model, xs, _images(2), layer="fc1", eps=0.1, step_size=0.05, steps=5)
    assert x_d.min() >= 0 and x_d.max() <= 1 and (x_d - xs).abs().max() <= 0.1 + 1e-6


def test_model_state_left_as_found(model):
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    first = next(model.parameters())
    first.requires_grad_(False)
    try:
        distill(model, _images(1), _images(2), layer="conv2", eps=0.07, step_size=0.007, steps=2)
        assert model.training
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
        flags = [p.requires_grad for p in model.parameters()]
        assert flags == [False] + [True] * (len(flags) - 1)
    finally:
        first.requires_grad_(True)
        for p in model.parameters():
            p.grad = None
        model.eval()


def test_hand_worked_update_with_momentum():
    """grad of 1/2||w.x - t||^2 is (w.x - t) w; momentum sums L1-normalized gradients; step = -a * sign(g)."""

    class Linear1(Classifier):
        layer_names = ("logits",)

        def __init__(self) -> None:
            super().__init__(InputSpec(1, 2, 1, (0.0,), (1.0,)))
            self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.0]))

        def _run(self, z, stop_at, pre_activation):
            return (z.flatten(1) * self.w).sum(1, keepdim=True)

    m = Linear1()
    xs = torch.full((1, 1, 2, 2), 0.5)
    xt = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]]])  # w.xt = 0.9 - 0.2 + 0.25 = 0.95 > w.xs = -0.25
    out = distill(m, xs, xt, layer="logits", eps=0.3, step_size=0.1, steps=2)
    # w.x < target, so grad = (w.x - t) w has sign -sign(w): x moves by +a*sign(w), twice; w=0 stays
    expected = torch.tensor([[[[0.7, 0.3], [0.7, 0.5]]]])
    torch.testing.assert_close(out, expected)


def test_signed_descent_momentum_normalizes_per_example():
    """Per-example L1 normalization: a huge gradient on example 0 must not shrink example 1's history."""
    calls = iter([torch.tensor([[100.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-0.5, 1.0]])])
    out = signed_descent(lambda x: next(calls), torch.full((2, 2), 0.5), eps=1.0, step_size=0.1, steps=2,
                         momentum=1.0, random_start=False, generator=None)
    # example 1: g = (1,0) + (-0.5,1)/1.5 -> (+, +); a batch-wide norm would give
    # (0.01,0) + (-0.2,0.4) -> (-, +), accumulating signs (foolbox) (0, +)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.5], [0.3, 0.4]]))


def test_without_momentum_follows_raw_sign():
    calls = iter([torch.tensor([[1.0, -1.0]]), torch.tensor([[-3.0, -1.0]])])
    out = signed_descent(lambda x: next(calls), torch.full((1, 2), 0.5), eps=1.0, step_size=0.1, steps=2,
                         momentum=None, random_start=False, generator=None)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.7]]))


def test_config_defaults_are_the_authors_and_bad_values_raise():
    cfg = DistillConfig()
    assert (cfg.eps, cfg.step_size, cfg.steps, cfg.momentum, cfg.pre_activation, cfg.random_start) == (
        0.07, 0.007, 10, 1.0, True, False)
    with pytest.raises(ValueError, match="eps"):
        DistillConfig(eps=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        DistillConfig(step_size=0.0)
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=-1)


def test_works_inside_no_grad(model):
    with torch.no_grad():
        x_d = distill(model, _images(1), _images(2), layer="fc2", eps=0.05, step_size=0.01, steps=3)
    assert (x_d - _images(1)).abs().max() > 0


def test_bad_arguments_raise(model):
    with pytest.raises(ValueError, match="same shape"):
        distill(model, _images(1, 4), _images(2, 5), layer="fc1", eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        distill(model, _images(1), _images(2), layer="fc9", eps=0.1, step_size=0.01, steps=1)


@pytest.mark.parametrize("arch,layer", [("conv", "conv2"), ("conv", "logits"), ("resnet20", "s1b2.out")])
def test_stacked_distillation_equals_member_by_member(arch, layer):
    """One stacked solve gives each member's own distilled batch, random starts included (float64)."""
    spec = SPEC if arch == "conv" else InputSpec(3, 8, 10, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    members = [build_model(arch, spec).double().train() for _ in range(3)]
    reference = copy.deepcopy(members)  # train-mode BatchNorm: each forward moves running statistics
    g = torch.Generator().manual_seed(4)
    xs, xt = (torch.rand(6, 3, spec.size, spec.size, generator=g, dtype=torch.float64) for _ in range(2))
    cfg = DistillConfig(steps=5, random_start=True)
    got = distill_stacked(stack_members(members), xs, xt, layer=layer, config=cfg,
                          generator=torch.Generator().manual_seed(7))
    rng = torch.Generator().manual_seed(7)
    for m, x_d in zip(reference, got):
        torch.testing.assert_close(x_d, distill_with(m, xs, xt, layer=layer, config=cfg, generator=rng),
                                   atol=1e-12, rtol=0)
    for m, r in zip(members, reference):
        for a, b in zip(m.buffers(), r.buffers()):
            torch.testing.assert_close(a, b)
