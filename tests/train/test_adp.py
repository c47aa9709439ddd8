"""ADP (Pang et al. 2019): the objective by hand, the diversity term's ordering, gradients to every
member, config checks, exact resume and the preset's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.checkpoint import latest_checkpoint
from phalanx.config import ConfigError, from_mapping, load_config
from phalanx.data import dataset_info, load_dataset
from phalanx.presets import resolve_config_path
from phalanx.runs import read_metrics
from phalanx.train.adp import (
    DET_OFFSET, LOG_OFFSET, Adp, AdpConfig, adp_objective, log_ensemble_diversity, non_maximal_predictions,
)
from phalanx.train.api import Batch
from phalanx.train.optimization import lr_at
from phalanx.train.registry import build_method
from tests.toy import digit_members

SPEC = dataset_info("digits").spec


_members = digit_members


def _digits(n: int):
    x, y = load_dataset("digits", "train")
    return x[:n].float() / 255, y[:n]


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _det3(a: list[list[float]]) -> float:
    """Rule of Sarrus."""
    return (a[0][0] * a[1][1] * a[2][2] + a[0][1] * a[1][2] * a[2][0] + a[0][2] * a[1][0] * a[2][1]
            - a[0][2] * a[1][1] * a[2][0] - a[0][0] * a[1][2] * a[2][1] - a[0][1] * a[1][0] * a[2][2])


def _log_ed(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return log_ensemble_diversity(non_maximal_predictions(z, y))


# 3 members, 2 examples, 4 classes
LOGITS = [[[2.0, 0.5, -1.0, 0.0], [0.1, 1.2, 0.3, -0.4]],
          [[1.0, -0.5, 1.5, 0.2], [0.0, 2.0, -1.0, 0.5]],
          [[0.3, 0.3, -0.2, 1.1], [-0.5, 0.7, 1.9, 0.0]]]
LABELS = [0, 1]


def test_objective_matches_a_hand_computation():
    alpha, beta = 2.0, 0.5
    per_example, ces, entropies, log_eds = [], [[], [], []], [], []
    for b, y in enumerate(LABELS):
        probs = [_softmax(member[b]) for member in LOGITS]
        ce = [-math.log(p[y]) for p in probs]
        mean = [sum(p[k] for p in probs) / 3 for k in range(4)]
        entropy = -sum(q * math.log(q + LOG_OFFSET) for q in mean)
        rest = [[v for k, v in enumerate(p) if k != y] for p in probs]
        unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rest]
        gram = [[sum(u * v for u, v in zip(unit[i], unit[j])) + (DET_OFFSET if i == j else 0.0)
                 for j in range(3)] for i in range(3)]
        log_ed = math.log(_det3(gram))
        per_example.append(sum(ce) - alpha * entropy - beta * log_ed)
        for i in range(3):
            ces[i].append(ce[i])
        entropies.append(entropy)
        log_eds.append(log_ed)

    out = adp_objective(torch.tensor(LOGITS), torch.tensor(LABELS), alpha=alpha, beta=beta)
    assert float(out.loss) == pytest.approx(sum(per_example) / 2, rel=1e-5)
    assert out.member_losses.tolist() == pytest.approx([sum(c) / 2 for c in ces], rel=1e-5)
    assert float(out.extras["ensemble_entropy"]) == pytest.approx(sum(entropies) / 2, rel=1e-5)
    assert float(out.extras["log_ensemble_diversity"]) == pytest.approx(sum(log_eds) / 2, rel=1e-5)


def test_non_maximal_predictions_drop_the_label_and_stay_finite_for_a_certain_member():
    z = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[200.0, 0.0, 1.0, 2.0]]])
    y = torch.tensor([0])
    got = non_maximal_predictions(z, y)
    assert got.shape == (2, 1, 3)
    p = z[0, 0].softmax(0)[1:]
    torch.testing.assert_close(got[0, 0], p / p.norm())
    # member 2 puts all of float32's probability on the label: its other entries still normalise
    assert torch.isfinite(got).all() and float(got[1, 0].norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got[1, 0], torch.tensor([1.0, math.e, math.e ** 2]) / math.sqrt(
        1 + math.e ** 2 + math.e ** 4))


def test_log_det_grows_with_diversity_and_identical_members_give_the_minimum():
    y = torch.tensor([0])
    # two members: the label's logit 3, the rest puts weight on the same or on other wrong classes
    same = torch.tensor([[[3.0, 4.0, 0.0, 0.0]], [[3.0, 4.0, 0.0, 0.0]]])
    near = torch.tensor([[[3.0, 4.0, 0.0, 0.0]], [[3.0, 4.0, 2.0, 0.0]]])
    apart = torch.tensor([[[3.0, 4.0, 0.0, 0.0]], [[3.0, 0.0, 4.0, 0.0]]])
    far = torch.tensor([[[3.0, 8.0, 0.0, 0.0]], [[3.0, 0.0, 8.0, 0.0]]])
    values = [float(_log_ed(z, y)) for z in (same, near, apart, far)]
    assert values == sorted(values) and len(set(values)) == 4, values
    # identical unit vectors: det [[1+d, 1], [1, 1+d]] = 2d + d^2; orthogonal ones approach (1+d)^2
    assert values[0] == pytest.approx(math.log(2 * DET_OFFSET + DET_OFFSET ** 2), rel=1e-6)
    assert values[-1] < 2 * math.log(1 + DET_OFFSET) and values[-1] > -1e-3

    # three members over 10 classes: any ensemble lies between identical members and the upper bound
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 64, 10, generator=g) * 3
    y = torch.randint(10, (64,), generator=g)
    identical = _log_ed(z[:1].expand(3, -1, -1), y)
    diverse = _log_ed(z, y)
    expected_min = math.log(DET_OFFSET ** 2 * (3 + DET_OFFSET))  # det(11^T + dI) = d^2 (3 + d)
    torch.testing.assert_close(identical, torch.full_like(identical, expected_min), rtol=1e-6, atol=0)
    assert bool((diverse > identical).all()) and bool((diverse <= 3 * math.log(1 + DET_OFFSET)).all())


@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 0.0), (0.0, 0.5), (2.0, 0.5)])
def test_the_regularizer_reaches_every_members_parameters(alpha, beta):
    members = _members(3)
    x, y = _digits(16)
    out = Adp(AdpConfig(alpha=alpha, beta=beta)).loss(members, Batch(x, y), torch.Generator().manual_seed(0))
    regularizer = out.loss - sum(out.member_losses.tolist())  # -alpha H - beta log ED
    expected = -alpha * float(out.extras["ensemble_entropy"]) - beta * float(out.extras["log_ensemble_diversity"])
    assert float(regularizer.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    for m in members:
        grads = torch.autograd.grad(regularizer, list(m.parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_bfloat16_autocast_keeps_the_regularizer_in_float32():
    members = _members(2)
    x, y = _digits(32)
    method = Adp(AdpConfig())
    ref = method.loss(members, Batch(x, y), torch.Generator())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method.loss(members, Batch(x, y), torch.Generator())
    assert low.loss.dtype == torch.float32 and torch.isfinite(low.loss)
    key = "log_ensemble_diversity"
    assert float(low.extras[key]) == pytest.approx(float(ref.extras[key]), abs=0.1)


@pytest.mark.parametrize(("params", "message"), [
    ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
    ({"beta": -0.5}, "beta must be a finite number >= 0"),
    ({"beta": float("nan")}, "beta must be a finite number >= 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
])
def test_bad_weights_are_refused_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        AdpConfig(**params)
    key = next(iter(params))
    with pytest.raises(ConfigError, match=rf"method(: |\.){key}"):  # the loader names the key too
        from_mapping(AdpConfig, params, "method")


def test_the_registry_builds_it_and_refuses_unknown_keys_and_too_few_members():
    method = build_method("adp", {"alpha": 1, "beta": 0.25})
    assert isinstance(method, Adp) and method.cfg == AdpConfig(alpha=1.0, beta=0.25)
    assert build_method("adp", {}).cfg == AdpConfig(alpha=2.0, beta=0.5)
    with pytest.raises(ConfigError, match="unknown key in method 'lamda'"):
        build_method("adp", {"lamda": 2.0})
    x, y = _digits(4)
    with pytest.raises(ValueError, match="at least 2 members"):
        method.loss(_members(1), Batch(x, y), torch.Generator())


def test_the_presets_schedule_is_the_authors_keras_schedule():
    cfg = load_config(resolve_config_path("adp/resnet20-cifar10"))
    assert cfg.train.method == "adp" and build_method("adp", cfg.method).cfg == AdpConfig()

    def keras(epoch: int) -> float:  # train_cifar.py lr_schedule at 39490d8, 0-based epochs
        return 1e-3 * (1e-3 if epoch > 160 else 1e-2 if epoch > 120 else 1e-1 if epoch > 80 else 1)

    for epoch in range(cfg.train.epochs):
        lr = lr_at(epoch, cfg.optim.lr, cfg.optim, cfg.train.epochs)
        assert lr == pytest.approx(keras(epoch), rel=1e-9), epoch
    assert load_config(resolve_config_path("quickstart/adp")).train.method == "adp"


SETTINGS = ["train.method=adp", "data.dataset=digits", "data.train_subset=192", "data.val_size=64",
            "model.members=3", "train.epochs=2", "train.batch_size=32", "train.checkpoint_every_steps=2",
            "optim.name=adam", "optim.lr=0.003", "device=cpu"]


def test_an_interrupted_run_resumes_mid_epoch_to_the_same_weights(straight_and_resumed):
    straight, resumed = straight_and_resumed(load_config(None, SETTINGS))
    a = latest_checkpoint(straight / "checkpoints").tensors
    b = latest_checkpoint(resumed / "checkpoints").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = read_metrics(resumed)
    assert [m["epoch"] for m in logged] == [1, 2]
    assert {"train_ensemble_entropy", "train_log_ensemble_diversity"} <= logged[-1].keys()
