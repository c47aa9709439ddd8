"""Data-parallel training under torchrun: 2 CPU processes (gloo) give the weights of one process
with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from phalanx.checkpoint import latest_checkpoint
from phalanx.config import load_config
from phalanx.runs import read_metrics
from phalanx.train.loop import train

# global batch 64 (32 per rank); 200 examples leave a last batch of 8 (4 per rank)
SETTINGS = ["data.dataset=digits", "data.train_subset=200", "data.val_size=0", "model.members=2",
            "train.epochs=2", "train.batch_size=64", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
            "device=cpu", "train.checkpoint_every_steps=3"]


# DVERGE: two batches per step, the members stacked (seed Conv), a layer drawn per epoch from the
# synchronized stream; distillation is per example, so each rank's shard distills as one process would
DVERGE = ["train.method=dverge", "method.distill.steps=2"]


# ADP: the members' coupled objective on each rank's shard (a per-example mean, so the weighted
# shard means give the global mean)
ADP = ["train.method=adp"]


# TRS: CE, |cos| and squared-norm terms by double back-propagation, per-example means (the
# smoothness scaled by a fixed smooth_batch, not the shard's size); delta 0: no random draws, whose
# per-shard starts are equally distributed but not bit-equal to one process's
TRS = ["train.method=trs", "method.init_delta=0", "method.final_delta=0", "method.lambda_a=1",
       "method.smooth_batch=8"]


@pytest.mark.parametrize("method", [[], DVERGE, ADP, TRS], ids=["baseline", "dverge", "adp", "trs"])
@pytest.mark.integration  # runs phalanx in a subprocess
def test_two_gloo_processes_match_one_process(tmp_path, method):
    settings = SETTINGS + method
    single = train(load_config(None, settings), tmp_path / "single", progress=False)

    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "phalanx", "train", "quickstart/baseline", "--out", str(out), "--quiet"]
    for s in settings:
        argv += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]

    a = latest_checkpoint(single / "checkpoints")
    b = latest_checkpoint(out / "checkpoints")
    assert a.meta["epoch"] == b.meta["epoch"] == 2
    members = [k for k in a.tensors if k.startswith("member")]
    assert members and set(members) <= set(b.tensors)
    for k in members:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], atol=1e-5, rtol=1e-4, msg=k)
    ma, mb = read_metrics(single), read_metrics(out)
    assert [m["epoch"] for m in mb] == [1, 2]  # rank 0 alone writes: each epoch once
    assert mb[-1]["train_loss"] == pytest.approx(ma[-1]["train_loss"], rel=1e-4)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
