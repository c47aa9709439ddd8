"""Which errors the CLI reports as the user's (exit 2, one line) and which as bugs (a traceback).

Only the project's own user-facing error types are usage errors; a bare ValueError raised inside a
command is an internal error and must not be dressed up as a bad argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx import cli
from phalanx.checkpoint import CheckpointError
from phalanx.cli import main
from phalanx.config import ConfigError
from phalanx.data import DataError
from phalanx.errors import UsageError
from phalanx.eval.transfer import TransferSetDamaged
from phalanx.files import DamagedFileError
from phalanx.runs import RunDirError
from phalanx.tensorboard import TensorboardUnavailable

ROOT = Path(__file__).resolve().parents[1]


def _failing_command(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """`phalanx presets` raising `error` from inside the command."""
    def list_presets() -> list[str]:
        raise error
    monkeypatch.setattr(cli, "list_presets", list_presets)


@pytest.mark.parametrize("error", [
    ConfigError("train.epochs = 0 is not allowed"), DataError("mnist train: found none of the files"),
    RunDirError("runs/x is in use"), CheckpointError("checkpoint damaged"),
    DamagedFileError("x.json is damaged"),
    TransferSetDamaged("transfer set damaged"), TensorboardUnavailable("--tensorboard needs tensorboard"),
    UsageError("--steps needs --attack"),
], ids=lambda e: type(e).__name__)
def test_the_projects_own_errors_exit_2_with_one_line(monkeypatch, capsys, error):
    _failing_command(monkeypatch, error)
    assert main(["presets"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"phalanx: error: {error}"]


@pytest.mark.parametrize("error", [ValueError("bug: shapes (3,) and (4,) not aligned"), KeyError("bug"),
                                   AssertionError("pgd left its threat model")],
                         ids=["ValueError", "KeyError", "AssertionError"])
def test_an_internal_error_is_not_a_usage_error(monkeypatch, capsys, error):
    _failing_command(monkeypatch, error)
    with pytest.raises(type(error)) as caught:
        main(["presets"])
    assert caught.value is error  # not caught, so `python -m phalanx` prints its traceback and exits 1
    assert "phalanx: error:" not in capsys.readouterr().err


@pytest.mark.integration  # runs phalanx in a subprocess
def test_an_internal_value_error_ends_the_process_with_a_traceback_and_exit_1():
    script = ("import sys\n"
              "import phalanx.cli as cli\n"
              "def broken():\n"
              "    raise ValueError('internal: a bug, not the user')\n"
              "cli.list_presets = broken\n"
              "sys.exit(cli.main(['presets']))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: internal: a bug, not the user" in done.stderr and "phalanx: error:" not in done.stderr


def test_a_config_error_from_a_real_command_still_exits_2(tmp_path, capsys):
    argv = ["train", "quickstart/baseline", "--out", str(tmp_path / "run"), "--quiet",
            "--set", "train.epochs=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phalanx: error:")
    assert "train.epochs = 0 is not allowed" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_refusal_of_the_library_reaches_the_user_as_a_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist or is not a directory" in err[0]
