"""The `gdr` training method: its term is the smooth GDR of the loss gradients and lowers it."""

from __future__ import annotations

import functools

import pytest
import torch

from phalanx.config import ConfigError, from_mapping
from phalanx.data import dataset_info, load_dataset
from phalanx.eval.gdr import gradient_diversity_rating
from phalanx.train.api import Batch
from phalanx.train.gdr import Gdr, GdrConfig
from phalanx.train.registry import build_method
from tests.toy import digit_members

SPEC = dataset_info("digits").spec


_members = functools.partial(digit_members, activation="leaky_relu")


def test_loss_is_ce_plus_lambda_gdr_and_reaches_every_member():
    members = _members(3)
    x, y = load_dataset("digits", "train")
    x = x[:16].float() / 255
    out = Gdr(GdrConfig(gdr_lambda=0.5)).loss(members, Batch(x, y[:16]), torch.Generator())
    expected = sum(out.member_losses.tolist()) / 3 + 0.5 * float(out.extras["gdr"])
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    term = out.loss - sum(out.member_losses.tolist()) / 3
    grads = torch.autograd.grad(term, [p for m in members for p in m.parameters()], allow_unused=True)
    for i in range(3):
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[i * 10:(i + 1) * 10])


def test_short_run_lowers_the_rating():
    """After a CE warm-up, 60 GDR steps end with a lower rating than 60 more CE-only steps."""
    import copy

    x, y = load_dataset("digits", "train")
    x = x.float() / 255
    probe = torch.arange(0, 1400, 7)

    def run(members, method, steps, seed):
        opt = torch.optim.Adam([p for m in members for p in m.parameters()], lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(y), (64,), generator=g)
            out = method.loss(members, Batch(x[idx], y[idx]), g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return float(gradient_diversity_rating(members, x[probe], y[probe], mode="loss").mean())

    members = _members(2)
    run(members, Gdr(GdrConfig(gdr_lambda=0.0)), 60, 0)
    control = run(copy.deepcopy(members), Gdr(GdrConfig(gdr_lambda=0.0)), 60, 1)
    regularized = run(members, Gdr(GdrConfig(gdr_lambda=2.0)), 60, 1)
    assert regularized < control - 0.02, (control, regularized)


def test_config():
    with pytest.raises(ConfigError, match="gdr_lambda"):
        from_mapping(GdrConfig, {"gdr_lambda": -0.1}, "method")
    assert isinstance(build_method("gdr", {}), Gdr)
