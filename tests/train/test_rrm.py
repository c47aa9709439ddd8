"""RRM (feature matching to a robust teacher) and KD (logit distillation)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phalanx.config import ConfigError, from_mapping
from phalanx.data import dataset_info
from phalanx.models import build_model
from phalanx.train.api import Batch
from phalanx.train.kd import Kd, KdConfig, distillation_loss
from phalanx.train.registry import build_method
from phalanx.train.rrm import Rrm, RrmConfig, penultimate, representation_distance

SPEC = dataset_info("digits").spec
RUN = "unused-run"  # the teacher is injected


def _model(arch: str = "conv", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(arch, SPEC).train()


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return Batch(torch.rand(n, 1, 16, 16, generator=g), torch.randint(10, (n,), generator=g))


def test_rrm_term_is_zero_when_features_coincide_and_positive_otherwise():
    student = _model(seed=0)
    batch = _batch()
    same = Rrm(RrmConfig(teacher_run=RUN, xent_weight=0.0), teacher=copy.deepcopy(student).eval())
    out = same.loss([student], batch, torch.Generator())
    assert float(out.extras["representation_loss"]) == pytest.approx(0.0, abs=1e-6)
    other = Rrm(RrmConfig(teacher_run=RUN, xent_weight=0.0), teacher=_model(seed=1).eval())
    assert float(other.loss([student], batch, torch.Generator()).extras["representation_loss"]) > 0.01
    for kind in ("cosine", "l2"):
        s = torch.randn(4, 6)
        assert torch.allclose(representation_distance(s, s, kind), torch.zeros(4), atol=1e-6)
        assert (representation_distance(s, -s + 0.1, kind) > 0).all()


def test_rrm_loss_is_lambda_ce_plus_distance_with_one_forward():
    student, teacher = _model(seed=0), _model(seed=1).eval()
    batch = _batch()
    method = Rrm(RrmConfig(teacher_run=RUN, xent_weight=0.5, feat_weight=2.0), teacher=teacher)
    out = method.loss([student], batch, torch.Generator())
    with torch.no_grad():
        dist = (1 - F.cosine_similarity(penultimate(student, batch.x), penultimate(teacher, batch.x))).mean()
        expected = 0.5 * F.cross_entropy(student(batch.x), batch.y) + 2.0 * dist
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.extras["representation_loss"]) == pytest.approx(float(dist), rel=1e-5)


def test_projection_when_feature_sizes_differ():
    student, teacher = _model("conv"), _model("conv3", seed=1).eval()  # 84 vs 1024 features
    batch = _batch()
    method = Rrm(RrmConfig(teacher_run=RUN), teacher=teacher)
    with pytest.raises(RuntimeError, match="extra_parameters"):
        method.loss([student], batch, torch.Generator())
    params = method.extra_parameters([student])
    assert [tuple(p.shape) for p in params] == [(1024, 84), (1024,)]
    method.loss([student], batch, torch.Generator()).loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    assert all(p.grad is None for p in teacher.parameters())
    state = {k: v.clone() for k, v in method.state_dict().items()}
    again = Rrm(RrmConfig(teacher_run=RUN), teacher=teacher)
    again.extra_parameters([student])
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))
    same_size = Rrm(RrmConfig(teacher_run=RUN), teacher=_model("conv", seed=2).eval())
    assert same_size.extra_parameters([student]) == []


def test_kd_matches_hinton_and_is_zero_for_a_copy():
    student = _model(seed=0)
    batch = _batch()
    t = torch.randn(8, 10)
    s = torch.randn(8, 10)
    manual = 4.0 ** 2 * (F.softmax(t / 4, 1) * (F.log_softmax(t / 4, 1) - F.log_softmax(s / 4, 1))).sum(1).mean()
    assert float(distillation_loss(s, t, temperature=4.0)) == pytest.approx(float(manual), rel=1e-5)
    copy_method = Kd(KdConfig(teacher_run=RUN), teacher=copy.deepcopy(student).eval())
    assert copy_method.loss([student], batch, torch.Generator()).member_losses.tolist()[0] == pytest.approx(0.0, abs=1e-5)
    mixed = Kd(KdConfig(teacher_run=RUN, alpha=0.5, temperature=2.0), teacher=_model(seed=1).eval())
    out = mixed.loss([student], batch, torch.Generator())
    with torch.no_grad():
        tl, sl = mixed.teacher(torch.device("cpu"))(batch.x), student(batch.x)
        expected = 0.5 * distillation_loss(sl, tl, temperature=2.0) + 0.5 * F.cross_entropy(sl, batch.y)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_configs_and_teacher_loading(tmp_path):
    for cls, key in ((RrmConfig, "teacher_run"), (KdConfig, "teacher_run")):
        with pytest.raises(ConfigError, match=key):
            from_mapping(cls, {}, "method")
    with pytest.raises(ConfigError, match="alpha"):
        from_mapping(KdConfig, {"teacher_run": "r", "alpha": 2.0}, "method")
    assert isinstance(build_method("rrm", {"teacher_run": "r"}), Rrm)
    assert isinstance(build_method("kd", {"teacher_run": "r"}), Kd)

    from phalanx.config import load_config
    from phalanx.train.loop import train

    cfg = load_config(None, ["data.dataset=digits", "data.train_subset=64", "model.members=1", "train.epochs=1",
                             "train.batch_size=32", "device=cpu"])
    run = str(train(cfg, tmp_path / "teacher", progress=False))
    teacher = Rrm(RrmConfig(teacher_run=run)).teacher(torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="teacher_member = 3"):
        Kd(KdConfig(teacher_run=run, teacher_member=3)).teacher(torch.device("cpu"))
