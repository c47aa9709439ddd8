"""The `trs` training method: its loss against a closed form on linear members, the perturbation,
the delta schedule, double back-propagation, exact resume, presets and refused configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from phalanx.attacks import Norm, max_gradient_norm, project, sample_in_ball
from phalanx.checkpoint import latest_checkpoint
from phalanx.config import ConfigError, load_config
from phalanx.data import dataset_info, load_dataset
from phalanx.models import build_model
from phalanx.presets import PRESET_ROOT, resolve_config_path
from phalanx.runs import read_metrics
from phalanx.train.api import Batch

from phalanx.train.registry import build_method
from phalanx.train.trs import Trs, TrsConfig, delta_at, smoothness_points

SHAPE, CLASSES = (1, 3, 3), 4
D = 9


def _linear_members(n: int = 2) -> list[nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(10 + i)
        out.append(nn.Sequential(nn.Flatten(), nn.Linear(D, CLASSES)).double().train())
    return out


def _data(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, *SHAPE, generator=g, dtype=torch.float64), torch.randint(CLASSES, (b,), generator=g)


def _closed_form(member: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For f(x) = W x + b: per-example CE, its input gradient W^T (p - e_y), and the input gradient
    of ||W^T (p - e_y)||^2, 2 W^T (diag p - p p^T) W W^T (p - e_y)."""
    w, b = member[1].weight.detach(), member[1].bias.detach()
    z = x.flatten(1) @ w.T + b
    p = z.softmax(1)
    r = p - F.one_hot(y, CLASSES).double()
    ce = -z.log_softmax(1).gather(1, y[:, None])[:, 0]
    g = r @ w
    jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # d p / d z per example
    ascent = 2 * torch.einsum("kd,bkl,le,be->bd", w, jac, w, g)
    return ce, g, ascent


def _started(cfg: TrsConfig, members, epoch: int = 0) -> Trs:
    method = Trs(cfg)
    method.start_epoch(epoch, members, torch.Generator())
    return method


def test_loss_on_linear_members_is_the_closed_form():
    members, (x, y) = _linear_members(), _data()
    cfg = TrsConfig(lambda_a=3.0, lambda_b=7.0, init_delta=0.0, final_delta=0.0, smooth_batch=4)
    out = _started(cfg, members).loss(members, Batch(x, y), torch.Generator())

    (ce1, g1, _), (ce2, g2, _) = (_closed_form(m, x, y) for m in members)
    cos = F.cosine_similarity(g1, g2, dim=1)
    assert (cos < 0).any() and (cos > 0).any()  # |cos| and cos differ here: the test can tell them apart
    similarity = cos.abs().mean()
    smooth = (g1.pow(2).sum(1).mean() + g2.pow(2).sum(1).mean()) / 2 * 2 / 4 ** 2
    expected = ce1.mean() + ce2.mean() + 3.0 * similarity + 7.0 * smooth  # CEs summed, not averaged
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.member_losses.tolist() == pytest.approx([float(ce1.mean()), float(ce2.mean())])
    assert out.extras == pytest.approx({"similarity": float(similarity), "smoothness": float(smooth)})


def test_the_smoothness_term_is_taken_on_the_half_perturbed_points():
    members, (x, y) = _linear_members(), _data()
    cfg = TrsConfig(lambda_a=0.0, lambda_b=1.0, init_delta=0.05, final_delta=0.05, pgd_steps=3,
                    smooth_batch=2)
    x_s = smoothness_points(members, x, y, delta=0.05, steps=3, generator=torch.Generator().manual_seed(5))
    out = _started(cfg, members).loss(members, Batch(x, y), torch.Generator().manual_seed(5))
    g = [_closed_form(m, x_s, y)[1] for m in members]
    expected = sum(gi.pow(2).sum(1).mean() for gi in g) / 2 * 2 / 2 ** 2
    assert float(out.extras["smoothness"]) == pytest.approx(float(expected), rel=1e-10)
    assert not torch.equal(x_s, x)


def test_the_perturbation_keeps_the_first_half_and_ascends_the_gradient_norm_within_the_ball():
    members, (x, y) = _linear_members(), _data(9)
    flags = [(m.training, [p.requires_grad for p in m.parameters()]) for m in members]
    x_s = smoothness_points(members, x, y, delta=0.1, steps=6, generator=torch.Generator().manual_seed(1))
    assert x_s.shape == x.shape
    assert torch.equal(x_s[:4], x[:4])  # floor(9 / 2) clean examples first, as the authors' inputs[:N]
    moved = x_s[4:] - x[4:]
    assert float(moved.abs().max()) <= 0.1 + 1e-12 and x_s.min() >= 0 and x_s.max() <= 1
    assert (moved.abs().flatten(1).amax(1) > 0).all()

    def norms(points):
        return sum(_closed_form(m, points, y[4:])[1].pow(2).sum(1) for m in members)

    start = sample_in_ball(x[4:], eps=0.1, norm=Norm.LINF, generator=torch.Generator().manual_seed(1))
    assert float(norms(x_s[4:]).mean()) > float(norms(start).mean())
    assert [(m.training, [p.requires_grad for p in m.parameters()]) for m in members] == flags
    assert all(p.grad is None for m in members for p in m.parameters())


def test_one_perturbation_step_is_the_signed_closed_form_ascent():
    members, (x, y) = _linear_members(), _data()
    got = max_gradient_norm(members, x, y, eps=0.06, steps=1, generator=torch.Generator().manual_seed(3))
    start = sample_in_ball(x, eps=0.06, norm=Norm.LINF, generator=torch.Generator().manual_seed(3))
    ascent = sum(_closed_form(m, start, y)[2] for m in members).view_as(x)
    expected = project(start + 0.02 * ascent.sign(), x, eps=0.06, norm=Norm.LINF)  # step delta / 3
    torch.testing.assert_close(got, expected)


def test_delta_grows_linearly_per_epoch_and_stays_at_its_final_value():
    cfg = TrsConfig(init_delta=0.01, final_delta=0.03, delta_epochs=120)
    assert delta_at(0, cfg) == 0.01
    assert delta_at(60, cfg) == pytest.approx(0.02)
    assert delta_at(119, cfg) == pytest.approx(0.01 + 0.02 * 119 / 120)  # the authors' last epoch: below 0.03
    assert delta_at(120, cfg) == pytest.approx(0.03) and delta_at(500, cfg) == pytest.approx(0.03)
    members = _linear_members()
    method = Trs(cfg)
    with pytest.raises(RuntimeError, match="call start_epoch before loss"):
        method.loss(members, Batch(*_data()), torch.Generator())
    assert method.start_epoch(30, members, torch.Generator()) == {"delta": pytest.approx(0.015)}


@pytest.mark.parametrize("term", ["similarity", "smoothness"])
def test_each_term_reaches_every_members_parameters(term):
    spec = dataset_info("digits").spec
    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(build_model("conv", spec).train())
    x, y = load_dataset("digits", "train")
    batch = Batch(x[:16].float() / 255, y[:16])
    on, off = ("lambda_a", "lambda_b") if term == "similarity" else ("lambda_b", "lambda_a")
    cfg = TrsConfig(**{on: 1.0, off: 0.0}, init_delta=0.05, final_delta=0.05, pgd_steps=1, smooth_batch=4)
    out = _started(cfg, members).loss(members, batch, torch.Generator().manual_seed(0))
    regularizer = out.loss - sum(out.member_losses.tolist())
    for m in members:
        grads = torch.autograd.grad(regularizer, list(m.parameters()), retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(straight_and_resumed):
    settings = ["data.dataset=digits", "data.train_subset=192", "data.val_size=64", "model.members=2",
                "train.epochs=2", "train.batch_size=32", "optim.name=adam", "optim.lr=0.003", "device=cpu",
                "train.checkpoint_every_steps=2", "train.method=trs", "method.pgd_steps=2",
                "method.init_delta=0.1", "method.final_delta=0.2", "method.delta_epochs=2"]
    straight, resumed = straight_and_resumed(load_config(None, settings))
    a = latest_checkpoint(straight / "checkpoints").tensors
    b = latest_checkpoint(resumed / "checkpoints").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["delta"] for m in ma] == [m["delta"] for m in mb] == [pytest.approx(0.1), pytest.approx(0.15)]
    assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
    assert {"train_similarity", "train_smoothness"} <= set(ma[0])


@pytest.mark.parametrize("preset", ["trs/resnet20-cifar10", "quickstart/trs"])
def test_presets_ramp_delta_over_the_whole_run(preset):
    cfg = load_config(resolve_config_path(preset), [])
    assert cfg.train.method == "trs"
    assert cfg.method["delta_epochs"] == cfg.train.epochs  # the authors' schedule spans --epochs
    build_method("trs", cfg.method)
    raw = yaml.safe_load((PRESET_ROOT / f"{preset}.yaml").read_text())
    assert raw["method"].keys() == TrsConfig.__dataclass_fields__.keys()  # every parameter pinned


@pytest.mark.parametrize(("params", "message"), [
    ({"lambda_a": -1.0}, r"lambda_a must be a finite number >= 0, got -1\.0"),
    ({"lambda_b": float("nan")}, r"method\.lambda_b = nan is not allowed; expected a finite number"),
    ({"init_delta": -0.01}, r"init_delta must be a finite number >= 0"),
    ({"final_delta": 0.03, "init_delta": "big"}, r"method\.init_delta = 'big' is not allowed"),
    ({"delta_epochs": 0}, r"delta_epochs must be an integer >= 1, got 0"),
    ({"pgd_steps": 0}, r"pgd_steps must be an integer >= 1, got 0"),
    ({"smooth_batch": -128}, r"smooth_batch must be an integer >= 1, got -128"),
    ({"lambda": 1.0}, r"unknown key in method 'lambda'"),
])
def test_bad_values_are_refused_naming_the_value(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("trs", params)


def test_the_config_itself_refuses_non_finite_values():
    with pytest.raises(ValueError, match=r"final_delta must be a finite number >= 0, got inf"):
        TrsConfig(final_delta=float("inf"))


def test_one_member_is_refused():
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        Trs(TrsConfig()).start_epoch(0, _linear_members(1), torch.Generator())
