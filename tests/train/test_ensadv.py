"""Ensemble adversarial training: examples from the static models only, eps draws in [0, eps], T_Ens+Div."""

from __future__ import annotations

import functools

import math

import pytest
import torch
from torch import nn

from phalanx.config import ConfigError, from_mapping
from phalanx.data import dataset_info
from phalanx.train.api import Batch
from phalanx.train.ensadv import EnsAdv, EnsAdvConfig, EnsAdvGalConfig, draw_eps
from phalanx.train.registry import build_method
from tests.toy import digit_members

SPEC = dataset_info("digits").spec
RUNS = ("unused-run",)  # static models are injected, the run list is never read


def _linear_static(sign: float = 1.0) -> nn.Module:
    """Two classes, logits W x: the CE input gradient for label 0 is p_1 (w_1 - w_0), so its sign
    is sign(w_1 - w_0) = (+1, -1, +1, ...) * sign for every input."""
    lin = nn.Sequential(nn.Flatten(), nn.Linear(256, 2, bias=False))
    pattern = torch.tensor([1.0, -1.0]).repeat(128) * sign
    with torch.no_grad():
        lin[1].weight.copy_(torch.stack([-pattern, pattern]) * 0.01)
    return lin


_members = functools.partial(digit_members, activation="leaky_relu")


def test_examples_come_from_the_static_model_only():
    static = _linear_static()
    cfg = EnsAdvConfig(static_runs=RUNS, eps=0.3, label="true")
    method = EnsAdv(cfg, static_models=[static])
    x, y = torch.full((64, 1, 16, 16), 0.5), torch.zeros(64, dtype=torch.long)
    x_adv, k = method.adversarial_batch(Batch(x, y), torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    direction = torch.tensor([1.0, -1.0]).repeat(128)
    eps_b = delta[:, 0]
    assert k == 0
    assert torch.allclose(delta, eps_b[:, None] * direction[None], atol=1e-6)
    assert float(eps_b.min()) >= 0 and float(eps_b.max()) <= 0.3 + 1e-6
    # the trained members' gradients play no part: the loss leaves the static model untouched
    members = _members(2)
    out = method.loss(members, Batch(x, torch.zeros(64, dtype=torch.long)), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in static.parameters())
    assert all(p.grad is not None for m in members for p in m.parameters())


def test_predicted_labels_and_random_or_round_robin_source():
    statics = [_linear_static(1.0), _linear_static(-1.0)]
    x, y = torch.full((8, 1, 16, 16), 0.5), torch.zeros(8, dtype=torch.long)
    rr = EnsAdv(EnsAdvConfig(static_runs=RUNS, source="round-robin", eps_distribution="fixed", eps=0.1),
                static_models=statics)
    picks = [rr.adversarial_batch(Batch(x, y), torch.Generator())[1] for _ in range(4)]
    assert picks == [0, 1, 0, 1]
    rnd = EnsAdv(EnsAdvConfig(static_runs=RUNS), static_models=statics)
    g = torch.Generator().manual_seed(0)
    assert {rnd.pick(2, g) for _ in range(50)} == {0, 1}
    # a fixed eps and the static model's own prediction as the label: the step raises its loss
    x_adv, k = rr.adversarial_batch(Batch(x, y), torch.Generator())
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.1))
    pred = statics[k](x).argmax(1)
    ce = nn.functional.cross_entropy
    assert float(ce(statics[k](x_adv), pred)) > float(ce(statics[k](x), pred))


def test_eps_draw_is_a_half_normal_truncated_at_eps():
    eps = 0.3
    draws = draw_eps(50000, eps=eps, distribution="truncated-normal", generator=torch.Generator().manual_seed(0))
    assert float(draws.min()) >= 0 and float(draws.max()) <= eps + 1e-7
    # E|Z| for Z ~ N(0,1) truncated to [-2, 2]: sqrt(2/pi) (1 - e^-2) / erf(sqrt 2)
    expected = math.sqrt(2 / math.pi) * (1 - math.exp(-2)) / math.erf(math.sqrt(2)) * eps / 2
    assert float(draws.mean()) == pytest.approx(expected, rel=0.02)
    # P(|Z| > 1 | |Z| < 2) = (erf(2/sqrt 2) - erf(1/sqrt 2)) / erf(2/sqrt 2)
    tail = (math.erf(math.sqrt(2)) - math.erf(1 / math.sqrt(2))) / math.erf(math.sqrt(2))
    assert float((draws > eps / 2).float().mean()) == pytest.approx(tail, abs=0.01)


def test_ensadv_gal_adds_the_gal_term_and_configs():
    statics = [_linear_static()]
    members = _members(2)
    x, y = torch.rand(8, 1, 16, 16), torch.randint(2, (8,))
    plain = EnsAdv(EnsAdvConfig(static_runs=RUNS), static_models=statics)
    div = EnsAdv(EnsAdvGalConfig(static_runs=RUNS, gal_lambda=0.5), static_models=statics)
    a = plain.loss(members, Batch(x, y), torch.Generator().manual_seed(0))
    b = div.loss(members, Batch(x, y), torch.Generator().manual_seed(0))
    assert a.member_losses.tolist() == pytest.approx(b.member_losses.tolist(), rel=1e-5)  # same data, same CE
    expected = sum(b.member_losses.tolist()) / 2 + 0.5 * float(b.extras["gal"])
    assert float(b.loss.detach()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="static_runs"):
        from_mapping(EnsAdvConfig, {}, "method")
    with pytest.raises(ConfigError, match="source"):
        from_mapping(EnsAdvConfig, {"static_runs": ["a"], "source": "cyclic"}, "method")
    assert isinstance(build_method("ensadv+gal", {"static_runs": ["a"]}), EnsAdv)


def test_static_runs_are_loaded_lazily_from_run_directories(tmp_path):
    from phalanx.config import load_config
    from phalanx.train.loop import train

    cfg = load_config(None, ["data.dataset=digits", "data.train_subset=64", "model.members=2", "train.epochs=1",
                             "train.batch_size=32", "device=cpu", "eval.examples=8"])
    run = train(cfg, tmp_path / "static", progress=False)
    method = EnsAdv(EnsAdvConfig(static_runs=(str(run),)))
    assert method._static is None
    models = method.static_models(torch.device("cpu"))
    assert len(models) == 2 and not any(p.requires_grad for m in models for p in m.parameters())
    assert not any(m.training for m in models)
