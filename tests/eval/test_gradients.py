"""Gradient alignment (GAL paper eqs. 6-8) measured on models, and the GAAS analysis (section 4.4).

The equations by hand: tests/test_geometry.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from phalanx.eval.gradients import gaas, gaas_directions, gradient_alignment, hadamard, member_input_gradients


def _linear(seed: int, d: int = 16, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes))


def test_identical_members_have_cosine_one_and_the_model_is_left_alone():
    m = _linear(0)
    m.train()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    out = gradient_alignment([m, copy.deepcopy(m)], x, y)
    assert torch.allclose(torch.tensor(out["cosine"]), torch.ones(6, 1), atol=1e-6)
    assert out["pairs"] == [[0, 1]] and out["n"] == 6
    assert m.training and all(p.requires_grad and p.grad is None for p in m.parameters())


def test_member_gradients_are_the_ce_input_gradients():
    m = _linear(1)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    x_req = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(m(x_req), y, reduction="sum").backward()
    assert torch.allclose(member_input_gradients([m], x, y, batch_size=2)[0], x_req.grad.flatten(1))


@pytest.mark.parametrize("k", [4, 16, 36, 64])
def test_regular_hadamard_rows_are_orthogonal_with_equal_sums(k):
    h = hadamard(k)
    assert torch.equal(h.abs(), torch.ones(k, k))
    assert torch.equal(h @ h.T, k * torch.eye(k))
    assert torch.equal(h.sum(1), torch.full((k,), math.sqrt(k)))


def test_sylvester_and_unsupported_orders():
    assert torch.equal(hadamard(8, regular=False) @ hadamard(8, regular=False).T, 8 * torch.eye(8))
    with pytest.raises(ValueError, match="order 25 does not exist"):
        hadamard(25)
    with pytest.raises(ValueError, match="power of 2, got 12"):
        hadamard(12, regular=False)


def test_gaas_directions_are_orthogonal_linf_eps_and_aligned():
    g = torch.randn(2, 3, 5, 5)  # 75 dims: 4 blocks of 18, 3 dims left at 0
    dirs = gaas_directions(g, 4, 0.1)
    assert dirs.shape == (2, 4, 3, 5, 5)
    flat = dirs.flatten(2)
    gram = flat @ flat.transpose(1, 2)
    assert torch.allclose(gram, 0.01 * 72 * torch.eye(4).expand(2, 4, 4), atol=1e-6)
    assert float(flat.abs().max()) == pytest.approx(0.1)
    assert bool(((flat * g.flatten(1)[:, None]).sum(2) != 0).all())


def test_gaas_counts_grow_with_eps_on_a_linear_model():
    m = _linear(2, d=16, classes=2)
    x = torch.full((32, 1, 4, 4), 0.5) + 0.01 * torch.randn(32, 1, 4, 4)
    with torch.no_grad():
        y = m(x).argmax(1)
    out = gaas(m, x, y, ks=(4, 16), eps_values=(0.05, 0.2, 0.45), batch_size=10)
    assert out["n"] == 32
    for k in (4, 16):
        rows = [r for r in out["results"] if r["k"] == k]
        means = [sum(r["counts"]) for r in rows]
        assert means == sorted(means) and means[-1] > means[0]
        for r in rows:
            assert all(0 <= c <= k for c in r["counts"]) and len(r["p_at_least"]) == k
            assert r["p_all"] == r["p_at_least"][-1]
