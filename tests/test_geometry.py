"""The gradient geometry shared by training and evaluation (phalanx.geometry): GAL paper eqs. 6-8
and the GDR by hand, and one computation whether a training method logs it or the evaluation measures it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.eval.gdr import gradient_diversity_rating
from phalanx.eval.gradients import gradient_alignment
from phalanx.geometry import (
    ce_input_gradient,
    ce_input_gradients,
    coherence,
    cosine_matrix,
    gal_loss,
    gdr_from_gradients,
    member_pairs,
    orthant_probability,
    pairwise_cosines,
    smooth_gdr,
)
from phalanx.train.api import Batch
from phalanx.train.gal import Gal, GalConfig
from phalanx.train.gdr import Gdr, GdrConfig


# --- GAL paper eqs. 6-8 -------------------------------------------------------------------------------

def test_gal_two_members_is_their_cosine():
    g1 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    g2 = torch.tensor([[0.0, 2.0, 0.0], [2.0, 2.0, 0.0]])
    # log(exp(c)) = c: orthogonal -> 0, parallel -> 1
    assert torch.allclose(gal_loss(pairwise_cosines([g1, g2])), torch.tensor([0.0, 1.0]), atol=1e-6)


def test_gal_three_members_by_hand():
    g = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, -1.0]])]
    c12, c13, c23 = 0.0, -1 / math.sqrt(2), -1 / math.sqrt(2)
    expected = math.log(math.exp(c12) + math.exp(c13) + math.exp(c23))
    cos = pairwise_cosines(g)
    assert cos.squeeze(0).tolist() == pytest.approx([c12, c13, c23], abs=1e-6)
    assert float(gal_loss(cos)) == pytest.approx(expected, abs=1e-6)
    assert float(coherence(cos)) == pytest.approx(0.0, abs=1e-6)
    # the log-sum-exp bounds the max from above by at most log(#pairs)
    assert float(coherence(cos)) <= expected <= float(coherence(cos)) + math.log(3)


def test_coherence_and_gal_by_hand():
    # three gradients for one example: e1, e2 and (e1 + e2) / sqrt(2), as one (members, B, D) tensor
    g = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    cos = pairwise_cosines(g)  # pairs (0,1), (0,2), (1,2)
    assert member_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    s = 1 / math.sqrt(2)
    assert torch.allclose(cos, torch.tensor([[0.0, s, s]]))
    assert torch.allclose(coherence(cos), torch.tensor([s]))
    assert torch.allclose(gal_loss(cos), torch.tensor([math.log(math.exp(0.0) + 2 * math.exp(s))]))
    two = pairwise_cosines(torch.tensor([[[1.0, 0.0]], [[-2.0, 0.0]]]))
    assert torch.allclose(two, torch.tensor([[-1.0]])) and torch.allclose(gal_loss(two), torch.tensor([-1.0]))


def test_pairwise_cosines_are_the_cosine_matrix_off_its_diagonal_and_zero_for_a_zero_gradient():
    g = [torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    g[1][2] = 0.0
    matrix, pairs = cosine_matrix(g), pairwise_cosines(g)
    assert matrix.shape == (4, 3, 3) and torch.allclose(matrix.diagonal(dim1=1, dim2=2), torch.ones(4, 3))
    for k, (a, b) in enumerate(member_pairs(3)):
        assert torch.allclose(pairs[:, k], matrix[:, a, b], atol=1e-6)
    assert pairs[2, 0] == 0 and pairs[2, 2] == 0  # example 2: member 1's gradient is zero
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        pairwise_cosines(g[:1])


def test_input_gradients_are_per_example():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.randint(3, (5,))
    _, (g,) = ce_input_gradients([lin], x, y, create_graph=False)
    for b in range(5):
        xb = x[b:b + 1].clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(lin(xb), y[b:b + 1]).backward()
        assert torch.allclose(g[b], xb.grad[0], atol=1e-6)


def test_input_gradient_works_under_no_grad_and_keeps_a_graph_only_when_asked():
    lin = torch.nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.randint(3, (5,))
    with torch.no_grad():
        loss, grad = ce_input_gradient(lin, x, y)
    assert grad.shape == x.shape and not grad.requires_grad
    assert float(loss.detach()) == pytest.approx(float(nn.functional.cross_entropy(lin(x), y).detach()))
    _, grad = ce_input_gradient(lin, x, y, create_graph=True)
    assert grad.requires_grad  # differentiable in the parameters: double back-propagation


# --- GDR ---------------------------------------------------------------------------------------------

def _g(*rows):
    return torch.tensor([rows], dtype=torch.float64)


def test_two_members_orthogonal_aligned_opposite():
    e1, e2 = _g(1.0, 0.0, 0.0), _g(0.0, 3.0, 0.0)
    assert float(gdr_from_gradients([e1, e2])) == pytest.approx(0.25)  # a quarter of the circle
    assert float(gdr_from_gradients([e1, 2 * e1])) == pytest.approx(0.5, abs=1e-3)  # a half-plane
    assert float(gdr_from_gradients([e1, -e1])) == pytest.approx(0.0, abs=1e-3)
    # 60 degrees apart: (pi - theta) / (2 pi) = 1/3
    g60 = _g(0.5, math.sqrt(3) / 2, 0.0)
    assert float(gdr_from_gradients([e1, g60])) == pytest.approx(1 / 3, abs=1e-6)


def test_three_members_by_hand_and_the_blogs_example():
    e = torch.eye(3, dtype=torch.float64)
    assert float(gdr_from_gradients([e[0:1], e[1:2], e[2:3]])) == pytest.approx(1 / 8)
    # three coplanar gradients 120 degrees apart: no direction raises all three losses
    a = [_g(math.cos(t), math.sin(t)) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    assert float(gdr_from_gradients(a)) == pytest.approx(0.0, abs=1e-3)
    # Girard: pairwise angles 90, 90, 45 -> (2 pi - sum of angles) / (4 pi) = 3/32... checked vs MC below
    b = [_g(1.0, 0.0, 0.0), _g(0.0, 1.0, 0.0), _g(1.0, 0.0, 1.0)]
    angles = [math.pi / 2, math.pi / 4, math.pi / 2]
    expected = (2 * math.pi - sum(angles)) / (4 * math.pi)
    assert float(gdr_from_gradients(b)) == pytest.approx(expected, abs=1e-6)


def test_monte_carlo_matches_closed_forms_and_four_members():
    torch.manual_seed(0)
    grads = [torch.randn(5, 6, dtype=torch.float64) for _ in range(3)]
    corr = cosine_matrix(grads)
    exact = orthant_probability(corr)
    # force the estimator on a 3x3 problem by embedding it in 4 dims with an independent 4th member
    big = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    big[:, :3, :3] = corr
    mc = orthant_probability(big, samples=200000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mc, exact / 2, atol=4e-3)
    e = torch.eye(4, dtype=torch.float64)
    ortho = gdr_from_gradients([e[i:i + 1] for i in range(4)], generator=torch.Generator().manual_seed(0))
    assert float(ortho) == pytest.approx(1 / 16, abs=5e-3)
    same = gdr_from_gradients([e[0:1]] * 4, generator=torch.Generator().manual_seed(0))
    assert float(same) == pytest.approx(0.5, abs=1e-2)


def test_zero_gradient_and_smooth_surrogate():
    assert float(gdr_from_gradients([_g(1.0, 0.0), _g(0.0, 0.0)])) == 0.0
    e = torch.eye(4, dtype=torch.float64)
    assert float(smooth_gdr([e[i:i + 1] for i in range(4)])) == pytest.approx(1 / 8)  # each triple 1/8
    g = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    smooth_gdr(g).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in g)


# --- one computation for training and evaluation ------------------------------------------------------

def _linear_members(n: int) -> list[nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(20 + i)
        out.append(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)))
    return out


def test_what_training_logs_is_what_the_evaluation_measures():
    members = _linear_members(3)  # no dropout or BatchNorm: train and eval mode compute the same function
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logged = Gal(GalConfig(noise_eps=0.0)).loss(members, Batch(x, y), torch.Generator()).extras
    measured = gradient_alignment(members, x, y)
    assert logged["gal"] == pytest.approx(sum(measured["gal"]) / 6, rel=1e-6)
    assert logged["coherence"] == pytest.approx(sum(measured["coherence"]) / 6, rel=1e-6)
    two = members[:2]
    regularized = Gdr(GdrConfig()).loss(two, Batch(x, y), torch.Generator()).extras["gdr"]
    rated = gradient_diversity_rating(two, x, y, mode="loss")
    assert regularized == pytest.approx(float(rated.mean()), rel=1e-5)
