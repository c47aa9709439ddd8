"""Losses and ensemble objectives (attacks/losses.py) against hand computations, and APGD-T."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.attacks import Ensemble, Loss, apgd, apgd_t, objective_and_logits, targeted_dlr
from phalanx.attacks.losses import mora_logits, per_example_loss

from phalanx.models import Mixture


class FixedLogits(nn.Module):
    """A "model" that returns given logits plus a linear function of x (so gradients exist)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + x.flatten(1)[:, :1]


def test_dlr_and_targeted_dlr_by_hand():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0]])
    y = torch.tensor([0])
    # margin max_{j != 0} z_j - z_0 = 3 - 4; z_pi1 - z_pi3 = 4 - 1
    assert per_example_loss(z, y, Loss.DLR).item() == pytest.approx(-1 / 3)
    # eq. 6: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2) with t = 2: (3 - 4) / (4 - (1 + 0) / 2)
    assert targeted_dlr(z, y, torch.tensor([2])).item() == pytest.approx(-1 / 3.5)
    with pytest.raises(ValueError, match="at least 4 classes, got 3"):
        targeted_dlr(z[:, :3], y, torch.tensor([2]))


def test_ensemble_objectives_by_hand():
    member_logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])  # (members, batch, classes)
    mixture = Mixture([FixedLogits(member_logits[0]), FixedLogits(member_logits[1])])
    x, y = torch.zeros(1, 1, 2, 2), torch.tensor([0])
    ce = nn.functional.cross_entropy
    value, output = objective_and_logits(mixture, x, y, loss=Loss.CE, targeted=False, ensemble=Ensemble.MEAN_LOGITS)
    assert value.item() == pytest.approx(ce(member_logits.mean(0), y).item())
    assert torch.allclose(output, mixture(x))  # success is judged on the mixture's own output
    value, _ = objective_and_logits(mixture, x, y, loss=Loss.CE, targeted=False, ensemble=Ensemble.MEMBER_SUM)
    assert value.item() == pytest.approx(ce(member_logits[0], y).item() + ce(member_logits[1], y).item())
    value, _ = objective_and_logits(mixture, x, y, loss=Loss.CE, targeted=False, ensemble=Ensemble.OUTPUT)
    assert value.item() == pytest.approx(ce(mixture(x), y).item())


def test_mora_puts_the_weight_on_the_members_still_correct():
    """Member 1 is already fooled (class 1), member 0 still right: MORA's member part is member 0's logits."""
    member_logits = torch.tensor([[[2.0, 0.5, 0.0]], [[0.0, 3.0, 0.0]]], requires_grad=True)
    y = torch.tensor([0])
    combined = mora_logits(member_logits, y)
    output = torch.logsumexp(member_logits.log_softmax(-1), 0) - math.log(2)
    top = output.topk(2, dim=1).values
    expected = 0.1 * output / (top[:, 0] - top[:, 1]) + 0.9 * member_logits[0]
    assert torch.allclose(combined, expected, atol=1e-5)
    combined[0, 0].backward()
    assert member_logits.grad[0].abs().sum() > 0  # gradient reaches the correct member


def test_targeted_dlr_needs_true_and_target():
    z = torch.randn(6, 10)
    y = z.argmax(1)
    t = z.argsort(1, descending=True)[:, 1]
    assert (targeted_dlr(z, y, t) < 0).all()  # correct examples: target below the true class


@pytest.fixture(scope="module")
def ten_class_net():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 6, 6)
    w = torch.randn(36, 10)
    y = (x.flatten(1) @ w).argmax(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:64], y[:64]


def test_apgd_t_stays_in_the_ball_and_is_at_least_as_strong_as_its_first_target(ten_class_net):
    model, x, y = ten_class_net
    eps = 0.05
    one = apgd_t(model, x, y, eps=eps, steps=20, target_classes=1, generator=torch.Generator().manual_seed(0))
    nine = apgd_t(model, x, y, eps=eps, steps=20, target_classes=9, generator=torch.Generator().manual_seed(0))
    for x_adv in (one, nine):
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, acc_one, acc_nine = ((model(t).argmax(1) == y).float().mean() for t in (x, one, nine))
    assert acc_nine <= acc_one < clean  # more targets only add examples fooled


def test_apgd_restarts_only_add_examples_fooled(ten_class_net):
    model, x, y = ten_class_net
    runs = [apgd(model, x, y, eps=0.03, steps=10, restarts=r, generator=torch.Generator().manual_seed(0))
            for r in (1, 3)]
    with torch.no_grad():
        fooled = [model(r).argmax(1) != y for r in runs]
    assert (fooled[1] | ~fooled[0]).all()  # every example fooled by one run stays fooled with three
