"""Vulnerability diversity (report eq. 2) and the within-ensemble transferability matrix."""

from __future__ import annotations

import copy

import pytest
import torch

from phalanx.attacks.distillation import DistillConfig
from phalanx.attacks.diversity import distilled_loss_matrix, transferability_matrix, vulnerability_diversity
from phalanx.models import InputSpec, build_model

SPEC = InputSpec(channels=3, size=16, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
CFG = DistillConfig(eps=0.07, step_size=0.007, steps=5)


def _members(n: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return [build_model("conv", SPEC).train() for _ in range(n)]


def _data(b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, 16, 16, generator=g), torch.randint(10, (b,), generator=g),
            torch.rand(b, 3, 16, 16, generator=g), torch.randint(10, (b,), generator=g))


def test_diversity_is_symmetric_and_averages_the_cross_losses():
    members = _members()
    x, y, xs, ys = _data()
    loss = distilled_loss_matrix(members, x, y, xs, layer="fc1", distill_cfg=CFG)
    d = vulnerability_diversity(members, x, y, xs, ys, layer="fc1", distill_cfg=CFG)
    assert len(d) == 3 and all(len(row) == 3 and all(isinstance(v, float) for v in row) for row in d)
    for i in range(3):
        for j in range(3):
            assert d[i][j] == pytest.approx(d[j][i])
            assert d[i][j] == pytest.approx((loss[i][j] + loss[j][i]) / 2)
    assert all(m.training for m in members)  # mode left as found
    assert all(p.grad is None and p.requires_grad for m in members for p in m.parameters())


def test_identical_members_have_equal_entries_and_own_features_overlap_most():
    (m,) = _members(1)
    members = [m, copy.deepcopy(m)]
    x, y, xs, ys = _data()
    loss = distilled_loss_matrix(members, x, y, xs, layer=("conv2", "logits"), distill_cfg=CFG)
    assert loss[0][1] == pytest.approx(loss[0][0]) and loss[1][0] == pytest.approx(loss[1][1])
    # distilling toward x lowers the loss on x's label compared with the undistilled source
    with torch.no_grad():
        undistilled = float(torch.nn.functional.cross_entropy(m.eval()(xs), y))
    assert loss[0][0] < undistilled


def test_transferability_identical_members_off_diagonal_equals_diagonal():
    (m,) = _members(1)
    members = [m, copy.deepcopy(m), copy.deepcopy(m)]
    x, y, _, _ = _data(32)
    t = transferability_matrix(members, x, y, eps=0.1, alpha=0.02, steps=5, only_correct=False,
                               generator=torch.Generator().manual_seed(0))
    for i in range(3):
        assert all(t[i][j] == t[i][i] for j in range(3))
        assert 0.0 <= t[i][i] <= 1.0


def test_transferability_white_box_is_lowest():
    members = _members(2)
    x, y, _, _ = _data(64)
    t = transferability_matrix(members, x, y, eps=0.2, alpha=0.05, steps=10, restarts=2, only_correct=False,
                               generator=torch.Generator().manual_seed(0))
    assert t[0][0] <= t[0][1] and t[1][1] <= t[1][0]
    assert all(m.training for m in members)


def test_transferability_keeps_only_examples_every_member_gets_right():
    (m,) = _members(1)
    members = [m, copy.deepcopy(m)]
    x, _, _, _ = _data(32)
    with torch.no_grad():
        y = m.eval()(x).argmax(1)
    y[:8] = (y[:8] + 1) % 10  # wrong for both members: must be left out
    t = transferability_matrix(members, x, y, eps=0.0, alpha=0.01, steps=1)
    assert t == [[1.0, 1.0], [1.0, 1.0]]  # eps 0: every kept example stays correct
    with pytest.raises(ValueError, match="no example"):
        transferability_matrix(members, x[:8], y[:8], eps=0.1, alpha=0.02, steps=1)
