import math

import pytest
import torch

import phalanx
from phalanx.checkpoint import CheckpointError, latest_checkpoint
from phalanx.config import ConfigError, load_config
from phalanx.models import Mixture
from phalanx.runs import RunDirError, locked, read_metrics
from phalanx.train import loop
from phalanx.train.loop import TrainingDiverged, train
from phalanx.train.optimization import lr_at

TINY = ["data.dataset=digits", "data.train_subset=256", "model.members=2", "train.epochs=3",
        "train.batch_size=64", "optim.name=adam", "optim.lr=0.003", "device=cpu"]


def _cfg(*extra):
    return load_config(None, [*TINY, *extra])


def _weights(run_dir):
    return latest_checkpoint(run_dir / "checkpoints").tensors


def test_a_short_run_writes_a_complete_run_directory(tmp_path):
    run = train(_cfg(), tmp_path / "run", progress=False)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert len(metrics[0]["train_loss"]) == 2 and len(metrics[0]["val_member_acc"]) == 2
    assert metrics[-1]["train_loss"][0] < metrics[0]["train_loss"][0]  # it learns
    assert metrics[-1]["val_mixture_acc"] > 0.3  # digits after 36 steps: far above the 10% of chance
    assert (run / "config.yaml").is_file()
    mixture = phalanx.load_run(run)
    assert isinstance(mixture, Mixture) and not mixture.training and len(mixture) == 2


def test_members_start_from_different_seeds(tmp_path):
    run = train(_cfg("train.epochs=1"), tmp_path / "run", progress=False)
    t = _weights(run)
    assert not torch.equal(t["member0.stages.conv1.weight"], t["member1.stages.conv1.weight"])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train(_cfg(), tmp_path / "straight", progress=False)

    real_save = loop._save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(loop, "_save", real_save)
    train(_cfg(), tmp_path / "resumed", progress=False)

    a, b = _weights(straight), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3]


def test_a_run_directory_of_another_config_is_refused(tmp_path):
    train(_cfg("train.epochs=1"), tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="another configuration"):
        train(_cfg("train.epochs=1", "optim.lr=0.01"), tmp_path / "run", progress=False)


def test_a_locked_run_directory_is_refused(tmp_path):
    with locked(tmp_path / "run"):
        with pytest.raises(RunDirError, match="in use by another phalanx process"):
            train(_cfg("train.epochs=1"), tmp_path / "run", progress=False)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from phalanx.train.baseline import Baseline

    real_loss = Baseline.loss
    seen = {"n": 0}

    def poisoned(self, members, batch, rng):
        out = real_loss(self, members, batch, rng)
        seen["n"] += 1
        if seen["n"] == 6:  # epoch 2 (4 batches per epoch), step 2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Baseline, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 2"):
        train(_cfg(), tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").meta["epoch"] == 1


def test_batch_larger_than_the_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(_cfg("train.batch_size=100000"), tmp_path / "run", progress=False)


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.method = 'magic'"):
        train(_cfg("train.method=magic"), tmp_path / "run", progress=False)


def test_learning_rate_schedules():
    cfg = load_config(None, ["optim.schedule=step", "optim.milestones=[100, 150]"]).optim
    assert [lr_at(e, 0.1, cfg, 200) for e in (0, 99, 100, 150)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cos = load_config(None, ["optim.schedule=cosine"]).optim
    assert lr_at(0, 0.1, cos, 10) == pytest.approx(0.1) and lr_at(5, 0.1, cos, 10) == pytest.approx(0.05)


def test_init_from_starts_from_another_runs_weights(tmp_path):
    base = train(_cfg("train.epochs=1"), tmp_path / "base", progress=False)
    cfg = _cfg("train.epochs=1", "optim.lr=1e-9", f"train.init_from={base}")
    child = train(cfg, tmp_path / "child", progress=False)
    a, b = _weights(base), _weights(child)
    assert torch.allclose(a["member0.stages.logits.weight"], b["member0.stages.logits.weight"], atol=1e-6)


def test_bfloat16_precision_runs_the_method_under_autocast_and_keeps_float32_weights(tmp_path, monkeypatch):
    seen = []
    from phalanx.train.baseline import Baseline

    real_loss = Baseline.loss

    def spy(self, members, batch, rng):
        out = real_loss(self, members, batch, rng)
        seen.append(members[0](batch.x[:2]).dtype)
        return out

    monkeypatch.setattr(Baseline, "loss", spy)
    run = train(_cfg("train.precision=bfloat16", "train.epochs=2"), tmp_path / "bf16", progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for k, t in _weights(run).items() if k.startswith("member"))
    metrics = read_metrics(run)
    assert metrics[-1]["train_loss"][0] < metrics[0]["train_loss"][0]
    assert metrics[-1]["val_mixture_acc"] > 0.3


def test_an_unknown_precision_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="train.precision.*float32.*bfloat16"):
        _cfg("train.precision=float16")


def test_the_methods_per_batch_extras_are_logged_as_epoch_means(tmp_path):
    run = train(_cfg("train.method=gal", "train.epochs=2", "model.activation=leaky_relu"), tmp_path / "gal",
                progress=False)
    for record in read_metrics(run):
        assert -1.0 <= record["train_coherence"] <= 1.0  # GAL paper eq. 7, a cosine
        # two members, one pair: GAL (log-sum-exp over pairs) and coherence (max) are that pair's cosine
        assert math.isclose(record["train_gal"], record["train_coherence"], rel_tol=1e-5, abs_tol=1e-6)


def test_checkpoints_of_another_run_are_refused_naming_the_keys(tmp_path):
    import shutil
    run = train(_cfg("train.epochs=1"), tmp_path / "run", progress=False)
    other = train(_cfg("train.epochs=1", "optim.lr=0.01"), tmp_path / "other", progress=False)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(other / "checkpoints", run / "checkpoints")
    with pytest.raises(CheckpointError, match="optim.lr = 0.003 vs 0.01"):
        phalanx.load_run(run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="optim.lr"):
        train(_cfg("train.epochs=2"), run, progress=False)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_log_past_the_checkpoints_is_kept_and_the_resume_refused(tmp_path):
    run = train(_cfg("train.epochs=2"), tmp_path / "run", progress=False)
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="records epoch 2 but the newest checkpoint .* is at epoch 0"):
        train(_cfg("train.epochs=2"), run, progress=False)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_checkpoint_records_the_runs_identity(tmp_path):
    from phalanx.config import fingerprint
    cfg = _cfg("train.epochs=1")
    meta = latest_checkpoint(train(cfg, tmp_path / "run", progress=False) / "checkpoints").meta
    assert meta["fingerprint"] == fingerprint(cfg) and meta["arch"] == "conv" and meta["members"] == 2
    assert meta["dataset"] == "digits" and meta["classes"] == 10 and meta["input_shape"] == [1, 16, 16]
    assert fingerprint(_cfg("train.epochs=1", "name=x", "eval.examples=5", "train.keep_checkpoints=4")) == meta["fingerprint"]
    assert fingerprint(_cfg("train.epochs=1", "seed=1")) != meta["fingerprint"]


def test_a_lock_holds_the_process_id(tmp_path):
    import os
    from phalanx.runs import run_in_use
    assert run_in_use(tmp_path / "run") is None
    with locked(tmp_path / "run"):
        assert run_in_use(tmp_path / "run") == os.getpid()
    assert run_in_use(tmp_path / "run") is None
