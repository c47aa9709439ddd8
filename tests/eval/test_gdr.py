"""Gradient Diversity Rating of ensembles of real models (the closed forms by hand and the Monte
Carlo estimate: tests/test_geometry.py)."""

from __future__ import annotations

import pytest
import torch

from phalanx.data import dataset_info
from phalanx.eval.gdr import gradient_diversity_rating
from phalanx.models import build_model


def test_rating_of_real_members_is_a_probability_and_leaves_them_as_found():
    spec = dataset_info("digits").spec
    members = []
    for i in range(2):
        torch.manual_seed(i)
        members.append(build_model("conv", spec, "leaky_relu").train())
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    for mode in ("class", "loss"):
        r = gradient_diversity_rating(members, x, y, mode=mode)
        assert r.shape == (4,) and float(r.min()) >= 0 and float(r.max()) <= 0.5 + 1e-6
    same = gradient_diversity_rating([members[0], members[0]], x, y, mode="loss")
    assert torch.allclose(same, torch.full((4,), 0.5), atol=1e-3)
    assert all(m.training for m in members)
    assert all(p.grad is None for m in members for p in m.parameters())
    with pytest.raises(ValueError, match="mode"):
        gradient_diversity_rating(members, x, y, mode="margin")
