"""GAL (Kariyappa & Qureshi 2019): double back-prop reaches every member, the noisy copy, a short run.

Eqs. 6-8 by hand are tested with the functions that compute them, in tests/test_geometry.py."""

from __future__ import annotations

import functools

import warnings

import pytest
import torch

from phalanx.config import ConfigError, from_mapping
from phalanx.data import dataset_info, load_dataset
from phalanx.train.api import Batch
from phalanx.data.batching import truncated_normal
from phalanx.geometry import ce_input_gradients, coherence, pairwise_cosines
from phalanx.train.gal import Gal, GalConfig, add_truncated_noise
from phalanx.train.registry import build_method
from tests.toy import digit_members

SPEC = dataset_info("digits").spec


_members = functools.partial(digit_members, activation="leaky_relu")


def _digits():
    x, y = load_dataset("digits", "train")
    return x.float() / 255, y


def test_gal_term_reaches_every_members_parameters():
    members = _members(3)
    x, y = _digits()
    method = Gal(GalConfig(noise_eps=0.0))
    out = method.loss(members, Batch(x[:16], y[:16]), torch.Generator().manual_seed(0))
    # differentiate only the GAL part: total - mean CE
    gal_only = out.loss - sum(out.member_losses.tolist()) / 3
    grads = torch.autograd.grad(gal_only, [p for m in members for p in m.parameters()], allow_unused=True)
    per_member = [grads[i * 10:(i + 1) * 10] for i in range(3)]
    assert len(list(members[0].parameters())) == 10
    for gs in per_member:
        assert any(g is not None and float(g.abs().sum()) > 0 for g in gs)
    assert float(out.extras["gal"]) == pytest.approx(float(gal_only.detach() / 0.5), rel=1e-4)


def test_noise_is_truncated_and_clamped():
    g = torch.Generator().manual_seed(0)
    z = truncated_normal((20000,), std=0.5, generator=g)
    assert float(z.abs().max()) <= 1.0 + 1e-6
    assert 0.4 < float(z.std()) < 0.5  # truncation at 2 sigma shrinks the std to ~0.88 sigma
    x = torch.full((4, 1, 8, 8), 0.95)
    noisy = add_truncated_noise(x, eps=0.3, generator=g)
    assert float(noisy.max()) <= 1.0 and float((noisy - x).abs().max()) <= 0.3 + 1e-6


def test_noisy_copy_is_concatenated():
    method = Gal(GalConfig(noise_eps=0.3))
    x, y = torch.rand(4, 1, 16, 16), torch.arange(4)
    xs, ys = method.inputs(Batch(x, y), torch.Generator().manual_seed(0))
    assert xs.shape[0] == 8 and torch.equal(xs[:4], x) and torch.equal(ys, torch.cat([y, y]))
    assert not torch.equal(xs[4:], x)


def test_relu_members_warn_once_and_config_errors():
    method = Gal(GalConfig(noise_eps=0.0))
    members = _members(2, activation="relu")
    with pytest.warns(UserWarning, match="leaky_relu"):
        method.start_epoch(0, members, torch.Generator())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.start_epoch(1, members, torch.Generator())
    with pytest.raises(ValueError, match="at least 2 members"):
        method.check_members(members[:1])
    with pytest.raises(ConfigError, match="gal_lambda"):
        from_mapping(GalConfig, {"gal_lambda": -1}, "method")
    assert isinstance(build_method("gal", {"gal_lambda": 0.2}), Gal)


def test_short_run_lowers_coherence_on_digits():
    x, y = _digits()
    members = _members(3)
    params = [p for m in members for p in m.parameters()]
    g = torch.Generator().manual_seed(0)
    probe = torch.arange(0, 1400, 7)

    def mean_coherence() -> float:
        _, grads = ce_input_gradients(members, x[probe], y[probe])
        return float(coherence(pairwise_cosines(grads)).mean())

    # a short CE-only warm-up (GAL on an untrained net measures noise), then GAL steps
    opt = torch.optim.Adam(params, lr=3e-3)
    warm = Gal(GalConfig(gal_lambda=0.0, noise_eps=0.0))
    for _ in range(60):
        idx = torch.randint(len(y), (64,), generator=g)
        out = warm.loss(members, Batch(x[idx], y[idx]), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    before = mean_coherence()
    method = Gal(GalConfig(gal_lambda=0.5, noise_eps=0.3))
    for _ in range(60):
        idx = torch.randint(len(y), (64,), generator=g)
        out = method.loss(members, Batch(x[idx], y[idx]), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = mean_coherence()
    assert after < before - 0.05, (before, after)
