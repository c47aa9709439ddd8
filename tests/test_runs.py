"""`runs.open_run`: the one way evaluation opens a trained run (members, config, test split)."""

from __future__ import annotations

import pytest
import torch

from phalanx.config import ConfigError, load_config
from phalanx.data import load_dataset
from phalanx.presets import resolve_config_path
from phalanx.runs import load_members, open_run
from phalanx.train.loop import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = load_config(resolve_config_path("quickstart/baseline"),
                      ["data.train_subset=128", "model.members=2", "train.epochs=1", "train.batch_size=64",
                       "device=cpu"])
    return train(cfg, tmp_path_factory.mktemp("runs") / "run", progress=False)


def test_open_run_gives_the_checkpoints_members_in_eval_mode_and_the_test_split(tiny_run):
    run = open_run(tiny_run)
    members, cfg, meta = load_members(tiny_run)
    assert run.cfg == cfg and run.epoch == meta["epoch"] == 1 and run.device == torch.device("cpu")
    assert len(run.members) == 2 and not any(m.training for m in run.members)
    for opened, loaded in zip(run.members, members):
        for a, b in zip(opened.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    x, y = run.test_images(30)
    x_u8, y_all = load_dataset("digits", "test")
    assert torch.equal(x, x_u8[:30].float() / 255) and torch.equal(y, y_all[:30])
    assert len(run.test_images()[1]) == len(y_all)
    assert run.test_split() is run.test_split()  # read once
    assert run.test_split().copy is None and run.dataset_display() == "Digits (UCI 8x8, upsampled to 16x16)"
    assert not run.mixture().training


def test_a_bad_device_is_refused_before_the_run_is_read(tmp_path):
    with pytest.raises(ConfigError, match="device = 'gpu' is not allowed"):
        open_run(tmp_path / "no-such-run", "gpu")
