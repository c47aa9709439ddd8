"""--tensorboard: the epoch records of metrics.jsonl, as TensorBoard scalars."""

import json
import math
import sys

import pytest

from phalanx.cli import main
from phalanx.tensorboard import TensorboardUnavailable, record_scalars, require_tensorboard

TINY = ["--set", "data.train_subset=128", "--set", "model.members=2", "--set", "train.epochs=2",
        "--set", "train.batch_size=32", "--set", "device=cpu"]


def test_record_scalars_names_members_and_summarizes_matrices():
    record = {
        "epoch": 3, "lr": 0.01, "train_loss": [0.5, 0.7], "val_member_acc": [0.9, 0.8],
        "val_mixture_acc": 0.95, "val_source": "test", "layer": "conv2", "epoch_seconds": 1.5,
        "diversity_loss": float("nan"),
        "diagnostics": {"transferability": [[0.1, 0.6], [0.8, 0.2]],
                        "vulnerability_diversity": [[1.0, 4.0], [4.0, 2.0]]},
    }
    assert record_scalars(record) == {
        "lr": 0.01, "train/loss/member1": 0.5, "train/loss/member2": 0.7,
        "val/member_acc/member1": 0.9, "val/member_acc/member2": 0.8, "val/mixture_acc": 0.95,
        "epoch_seconds": 1.5,
        "diagnostics/transferability_offdiag_mean": pytest.approx(0.7),
        "diagnostics/vulnerability_diversity_offdiag_mean": 4.0,
    }


def test_training_with_tensorboard_logs_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), "--quiet", "--tensorboard", *TINY]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss/member1", "train/loss/member2", "val/mixture_acc", "lr"} <= tags
    for tag, key, index in [("val/mixture_acc", "val_mixture_acc", None),
                            ("train/loss/member2", "train_loss", 1)]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["epoch"], r[key] if index is None else r[key][index]) for r in records]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, expected))
    running = events.Scalars("train/running_loss")
    assert running and all(math.isfinite(e.value) for e in running)


def test_missing_tensorboard_is_a_usage_error_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(TensorboardUnavailable):
        require_tensorboard()
    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), "--quiet", "--tensorboard", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pip install 'phalanx[tensorboard]'" in err
    assert not run.exists()
