"""Training progress in a pipe or CI log: one line per epoch, no bar redrawn into hundreds of lines."""

from __future__ import annotations

import pytest
import subprocess
import sys


@pytest.mark.integration  # runs phalanx in a subprocess
def test_training_into_a_pipe_prints_one_line_per_epoch(tmp_path):
    args = [sys.executable, "-m", "phalanx.cli", "train", "quickstart/baseline", "--set", "data.dataset=digits", "--set", "model.members=2",
            "--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "data.train_subset=256",
            "--set", "device=cpu", "--out", str(tmp_path / "run")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    assert "batch/s" not in done.stderr and "\r" not in done.stderr  # no bar redrawn
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2, done.stdout
