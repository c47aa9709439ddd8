"""Exact resume: a run killed at any moment (SIGKILL included) and started again with the same
command ends with the weights of an uninterrupted run, and logs each epoch once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from phalanx.checkpoint import checkpoint_records, latest_checkpoint
from phalanx.config import load_config
from phalanx.runs import read_metrics
from phalanx.train import loop
from phalanx.train.loop import train

SETTINGS = ["data.dataset=digits", "data.train_subset=640", "model.members=2", "train.epochs=3",
            "train.batch_size=32", "optim.name=adam", "optim.lr=0.003", "device=cpu",
            "train.checkpoint_every_steps=3", "data.augment.flip=true", "data.augment.noise_std=0.05"]


def _cfg(*extra):
    return load_config(None, [*SETTINGS, *extra])


def _assert_same_final_weights(a_dir, b_dir):
    a = latest_checkpoint(a_dir / "checkpoints")
    b = latest_checkpoint(b_dir / "checkpoints")
    assert a.meta["epoch"] == b.meta["epoch"] == 3 and a.meta["batch"] == b.meta["batch"] == 0
    assert a.tensors.keys() == b.tensors.keys()
    different = [k for k in a.tensors if not torch.equal(a.tensors[k], b.tensors[k])]
    assert not different, different


def _command(out):
    argv = [sys.executable, "-m", "phalanx", "train", "quickstart/baseline", "--out", str(out), "--quiet"]
    for s in SETTINGS + ["data.val_size=0", "train.keep_checkpoints=2"]:
        argv += ["--set", s]
    return argv


def _kill_when(proc, ckpt_dir, seen, timeout=60.0):
    """SIGKILL `proc` as soon as a checkpoint newer than the `seen` ones is committed; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ckpt_dir.is_dir() and set(p.name for p in checkpoint_records(ckpt_dir)) - seen:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.integration  # runs phalanx in a subprocess
def test_sigkilled_run_resumes_to_bit_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    straight = tmp_path / "straight"
    subprocess.run(_command(straight), env=env, check=True, capture_output=True, timeout=120)

    out = tmp_path / "killed"
    kills = 0
    for _ in range(2):  # kill at the first checkpoint, then again at a later one
        seen = {p.name for p in checkpoint_records(out / "checkpoints")} if (out / "checkpoints").is_dir() else set()
        proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += _kill_when(proc, out / "checkpoints", seen)
    assert kills >= 1
    done = subprocess.run(_command(out), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    _assert_same_final_weights(straight, out)
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert [m["train_loss"] for m in read_metrics(out)] == [m["train_loss"] for m in read_metrics(straight)]
    assert not list(out.rglob("*.tmp"))


def test_mid_epoch_resume_with_crash_leftovers_is_exact(tmp_path, monkeypatch):
    straight = train(_cfg(), tmp_path / "straight", progress=False)

    real_save = loop._save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 9:  # mid-epoch 2 (20 batches per epoch, a checkpoint every 3 steps)
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_die)
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), run, progress=False)
    monkeypatch.setattr(loop, "_save", real_save)
    ckpts = run / "checkpoints"
    last = latest_checkpoint(ckpts)
    assert last.meta["epoch"] == 1 and last.meta["batch"] > 0 and "partial" in last.meta

    # What a kill during the next write can leave: a temporary file, and a tensor file whose JSON
    # (the commit marker) was never written; plus a metrics line torn half-way.
    (ckpts / ".epoch_0001_000027.safetensors.x1y2z3w4.tmp").write_bytes(b"\x00" * 100)
    (ckpts / "epoch_0001_000027.safetensors").write_bytes(b"partial tensors")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "lr": 0.0')
    assert latest_checkpoint(ckpts).path == last.path  # the resume does not misread them

    train(_cfg(), run, progress=False)
    _assert_same_final_weights(straight, run)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert [m["train_loss"] for m in read_metrics(run)] == [m["train_loss"] for m in read_metrics(straight)]
    assert not list(run.rglob("*.tmp")) and not (ckpts / "epoch_0001_000027.safetensors").exists()


def test_a_checkpoint_whose_tensors_were_replaced_after_its_json_is_skipped(tmp_path):
    run = train(_cfg("train.epochs=1"), tmp_path / "run", progress=False)
    records = checkpoint_records(run / "checkpoints")
    newest = records[-1]
    newest.with_suffix(".safetensors").write_bytes(b"not the tensors the JSON describes")
    assert latest_checkpoint(run / "checkpoints").path == records[-2]


def test_dverge_resumes_mid_epoch_to_the_same_weights(straight_and_resumed):
    """DVERGE draws its layer at each epoch start and uses the rng within steps: both are replayed."""
    extra = ["train.method=dverge", "method.distill.steps=2", "train.epochs=2", "data.train_subset=192",
             "train.batch_size=32", "train.checkpoint_every_steps=2", "data.val_size=64"]
    straight, resumed = straight_and_resumed(_cfg(*extra))
    a = latest_checkpoint(straight / "checkpoints").tensors
    b = latest_checkpoint(resumed / "checkpoints").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["layer"] for m in read_metrics(straight)] == [m["layer"] for m in read_metrics(resumed)]
