"""The loop trains, checkpoints and resumes a method's own parameters: RRM's projection from a
conv3 student (1024 penultimate features) to a conv teacher (84)."""

from __future__ import annotations

import pytest
import torch

from phalanx.checkpoint import latest_checkpoint
from phalanx.config import load_config
from phalanx.runs import read_metrics
from phalanx.train import loop
from phalanx.train.loop import train
from phalanx.train.rrm import Rrm

BASE = ["data.dataset=digits", "data.train_subset=256", "train.batch_size=64", "optim.name=adam",
        "optim.lr=0.003", "device=cpu"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    cfg = load_config(None, [*BASE, "model.arch=conv", "model.members=1", "train.epochs=1"])
    return train(cfg, tmp_path_factory.mktemp("teacher") / "run", progress=False)


def _student(teacher_run):
    return load_config(None, [*BASE, "model.arch=conv3", "model.members=2", "train.epochs=2",
                              "train.method=rrm", f"method.teacher_run={teacher_run}",
                              "train.checkpoint_every_steps=3"])


def _tensors(run_dir):
    return latest_checkpoint(run_dir / "checkpoints").tensors


def test_the_projection_trains_and_is_checkpointed(tmp_path, teacher_run, monkeypatch):
    built = []
    real = Rrm.extra_parameters

    def record(self, members):
        params = real(self, members)
        built.append([p.detach().clone() for p in params])
        return params

    monkeypatch.setattr(Rrm, "extra_parameters", record)
    run = train(_student(teacher_run), tmp_path / "run", progress=False)
    assert len(built) == 1 and [tuple(p.shape) for p in built[0]] == [(84, 1024), (84,)] * 2
    ckpt = latest_checkpoint(run / "checkpoints")
    saved = [ckpt.tensors[f"method.{i}.{k}"] for i in range(2) for k in ("weight", "bias")]
    assert all(not torch.equal(a, b) for a, b in zip(built[0], saved))  # trained
    assert len(ckpt.meta["optimizer"]["param_groups"]) == 3  # two members, then the method's group
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("die_at", [1, 2])  # mid-epoch (step 3), end of epoch 1
def test_an_interrupted_rrm_run_resumes_bit_identical(tmp_path, teacher_run, monkeypatch, die_at):
    cfg = _student(teacher_run)
    straight = train(cfg, tmp_path / "straight", progress=False)

    real_save = loop._save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(loop, "_save", real_save)
    torch.manual_seed(12345)  # the global generator's state must not matter
    train(cfg, tmp_path / "resumed", progress=False)

    a, b = _tensors(straight), _tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("method.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(straight)[-1]["train_loss"] == read_metrics(tmp_path / "resumed")[-1]["train_loss"]


@pytest.mark.integration  # runs phalanx in a subprocess
def test_two_gloo_processes_train_the_projection_as_one_process(tmp_path, teacher_run):
    import os
    import subprocess
    import sys

    settings = [*BASE, "data.train_subset=200", "data.val_size=0", "model.arch=conv3", "model.members=2",
                "train.epochs=1", "train.method=rrm", f"method.teacher_run={teacher_run}",
                "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]
    single = train(load_config(None, settings), tmp_path / "single", progress=False)
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "phalanx", "train", "quickstart/baseline", "--out", str(out), "--quiet"]
    for s in settings:
        argv += ["--set", s]
    done = subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _tensors(single), _tensors(out)
    keys = [k for k in a if k.startswith(("member", "method."))]
    assert any(k.startswith("method.") for k in keys) and set(keys) <= set(b)
    for k in keys:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
