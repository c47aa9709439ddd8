"""Adversarial training (Madry et al. PGD, Wong et al. FGSM-RS): own examples, in the ball, more robust."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phalanx.attacks import pgd
from phalanx.config import ConfigError, from_mapping
from phalanx.data import dataset_info, load_dataset
from phalanx.train.adversarial import Adversarial, AdversarialConfig, adversarial_examples
from phalanx.train.api import Batch
from phalanx.train.registry import build_method
from tests.toy import digit_members

SPEC = dataset_info("digits").spec


_members = digit_members


def _digits(split: str = "train"):
    x, y = load_dataset("digits", split)
    return x.float() / 255, y


@pytest.mark.parametrize("mode", ["pgd", "fgsm-rs"])
def test_each_member_trains_on_its_own_examples_inside_the_ball(mode):
    members = _members(2)
    x, y = _digits()
    x, y = x[:16], y[:16]
    cfg = AdversarialConfig(mode=mode, eps=0.1, steps=3, alpha=0.03 if mode == "pgd" else None)
    out = Adversarial(cfg).loss(members, Batch(x, y), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same stream, consumed member by member
    for m, logged in zip(members, out.member_losses.tolist()):
        x_adv = adversarial_examples(m, x, y, cfg, g)
        assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
        assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
        assert F.cross_entropy(m(x_adv), y).item() == pytest.approx(logged, rel=1e-5)
        assert F.cross_entropy(m(x_adv), y).item() > F.cross_entropy(m(x), y).item()
    other = adversarial_examples(members[1], x, y, cfg, torch.Generator().manual_seed(5))
    own = adversarial_examples(members[0], x, y, cfg, torch.Generator().manual_seed(5))
    assert not torch.allclose(other, own)


def test_pgd_mode_is_phalanx_pgd_with_madry_defaults():
    cfg = AdversarialConfig()
    assert (cfg.eps, cfg.step_size(), cfg.steps, cfg.random_start) == (8 / 255, 2 / 255, 7, True)
    assert AdversarialConfig(mode="fgsm-rs").step_size() == pytest.approx(1.25 * 8 / 255)
    m = _members(1)[0]
    x, y = _digits()
    a = adversarial_examples(m, x[:8], y[:8], cfg, torch.Generator().manual_seed(1))
    b = pgd(m, x[:8], y[:8], eps=8 / 255, alpha=2 / 255, steps=7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_config():
    with pytest.raises(ConfigError, match="mode"):
        from_mapping(AdversarialConfig, {"mode": "free"}, "method")
    with pytest.raises(ConfigError, match="steps"):
        from_mapping(AdversarialConfig, {"steps": 0}, "method")
    assert isinstance(build_method("adversarial", {"mode": "fgsm-rs"}), Adversarial)


def test_short_fast_at_run_beats_baseline_under_pgd():
    x, y = _digits()
    xt, yt = _digits("test")
    base, adv = _members(1, seed=1)[0], _members(1, seed=1)[0]
    method = Adversarial(AdversarialConfig(mode="fgsm-rs", eps=0.1))
    g = torch.Generator().manual_seed(0)
    opts = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in (base, adv)]
    for _ in range(150):
        idx = torch.randint(len(y), (64,), generator=g)
        losses = [F.cross_entropy(base(x[idx]), y[idx]), method.loss([adv], Batch(x[idx], y[idx]), g).loss]
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()

    def pgd_acc(m) -> float:
        x_adv = pgd(m, xt, yt, eps=0.1, alpha=0.01, steps=20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return float((m.eval()(x_adv).argmax(1) == yt).float().mean())

    a_base, a_adv = pgd_acc(base), pgd_acc(adv)
    assert a_adv > a_base + 0.1, (a_base, a_adv)
