"""Every bad input answered (docs/reliability.md): one test per row of the table, through the CLI.

Usage errors exit 2, failed runs exit 1; either way one line `phalanx: error: ...` on stderr,
no traceback, and no partial file (`*.tmp`) left in the run directory.
"""

import errno
import gzip
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

import phalanx
from phalanx.checkpoint import CheckpointError, checkpoint_records, latest_checkpoint
from phalanx.cli import main
from phalanx.data import DatasetName, registry

TINY = ["--set", "data.train_subset=128", "--set", "model.members=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=64", "--set", "device=cpu", "--set", "eval.examples=32", "--quiet"]


def _fails(argv, capsys, code, *messages):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    # one error line, last; before it only warnings asked for (e.g. allow_noncanonical's), never a traceback
    errors = [line for line in err if line.startswith("phalanx: error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    for message in messages:
        assert message in errors[0], errors[0]
    return errors[0]


def _no_partial_files(directory):
    assert not list(directory.rglob("*.tmp")) if directory.exists() else True


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A 6-example MNIST train split (and 4 test) in tmp_path/mnist, with small expected sizes."""
    monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.MNIST, "train"), 6)
    monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.MNIST, "test"), 4)
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(split, n, images_extra=b"", labels=None, cut=0):
        image_name, label_name = registry.IDX_FILES[split]
        raw = b"".join(d.to_bytes(4, "big") for d in (0x803, n, 28, 28)) + \
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes() + images_extra
        (folder / image_name).write_bytes(gzip.compress(raw[:len(raw) - cut]))
        labels = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
        (folder / label_name).write_bytes(gzip.compress(
            b"".join(d.to_bytes(4, "big") for d in (0x801, n)) + labels.astype(np.uint8).tobytes()))

    write("test", 4)
    return write, tmp_path / "data"


def _mnist_argv(root, out, *extra):
    return ["train", "quickstart/baseline", "--out", str(out), "--set", "data.dataset=mnist",
            "--set", f"data.root={root}", "--set", "train.batch_size=2", "--set", "train.epochs=1",
            "--set", "device=cpu", "--quiet", *extra]


# --- data ----------------------------------------------------------------------------------------

def test_missing_dataset_files(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(_mnist_argv(tmp_path / "empty", out), capsys, 2, "mnist train: found none of", "download=True")
    _no_partial_files(out)


def test_wrong_checksum(tiny_mnist, tmp_path, capsys):
    write, root = tiny_mnist
    write("train", 6)
    _fails(_mnist_argv(root, tmp_path / "run"), capsys, 2, "has md5", "allow_noncanonical")
    _no_partial_files(tmp_path / "run")


@pytest.mark.parametrize("damage, message", [
    ({"cut": 100}, "truncated"),
    ({"images_extra": b"\x00" * 100}, "found 4804"),
    ({"labels": [0, 1, 2, 3, 4, 10]}, "label 10 at index 5"),
], ids=["truncated", "oversized", "label-out-of-range"])
def test_damaged_dataset_files(tiny_mnist, tmp_path, capsys, damage, message):
    write, root = tiny_mnist
    write("train", 6, **damage)
    _fails(_mnist_argv(root, tmp_path / "run", "--set", "data.allow_noncanonical=true"), capsys, 2, message)
    _no_partial_files(tmp_path / "run")


# --- configuration ---------------------------------------------------------------------------------

def test_config_file_with_an_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochs": 1, "learning_rate": 0.1}}))
    _fails(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"], capsys, 2,
           "unknown key in train 'learning_rate'", "allowed keys")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.batch_size=100000"], "larger than the training set"),
    (["--set", "train.epochs=0"], "train.epochs = 0 is not allowed"),
    (["--set", "optim.lr=-1"], "optim.lr = -1.0 is not allowed"),
    (["--set", "train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps = -1 is not allowed"),
], ids=["batch-larger-than-dataset", "zero-epochs", "negative-lr", "negative-checkpoint-interval"])
def test_out_of_range_training_values(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    _fails(["train", "quickstart/baseline", "--out", str(out), *TINY, *argv], capsys, 2, message)
    _no_partial_files(out)


@pytest.fixture
def trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    return run


@pytest.mark.parametrize("argv, message", [
    (["--attack", "fgsm", "--eps", "-0.1"], ("eps", "-0.1")),
    (["--attack", "pgd-linf", "--steps", "0"], ("steps", "0")),
    (["--attack", "pgd-linf", "--alpha", "0"], ("alpha", "0")),
], ids=["negative-epsilon", "zero-steps", "zero-step-size"])
def test_out_of_range_attack_values(trained_run, capsys, argv, message):
    line = _fails(["eval", str(trained_run), "--quiet", *argv], capsys, 2, *message)
    assert "allowed" in line or ">=" in line or ">" in line
    _no_partial_files(trained_run)


@pytest.mark.parametrize("value", ["0", "-3", "some", "1.5"])
def test_examples_must_be_a_positive_integer_or_all(tmp_path, capsys, value):
    whitebox = tmp_path / "run" / "eval" / "whitebox.json"
    whitebox.parent.mkdir(parents=True)
    whitebox.write_text('{"results": []}')
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "run"), "--quiet", "--examples", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("phalanx eval: error: argument --examples:") and not any("Traceback" in e for e in err)
    assert f"'{value}' is not allowed" in err[-1] and "positive integer" in err[-1] and "'all'" in err[-1]
    assert whitebox.read_text() == '{"results": []}'
    _no_partial_files(tmp_path)


def test_an_attack_name_that_does_not_exist(trained_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(trained_run), "--attack", "deepfool"])
    assert exc.value.code == 2
    assert "invalid choice: 'deepfool'" in capsys.readouterr().err


def test_a_checkpoint_of_another_architecture(trained_run, capsys):
    path = trained_run / "config.yaml"
    path.write_text(path.read_text().replace("arch: conv", "arch: conv3"))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, "member 0 does not match", "another architecture")
    assert not (trained_run / "eval").exists()


def test_a_checkpoint_of_another_dataset(trained_run, capsys, tmp_path):
    path = trained_run / "config.yaml"
    path.write_text(path.read_text().replace("dataset: digits", "dataset: mnist"))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, "member 0 does not match", "another architecture or dataset")


# --- files that must not be trusted ------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    if writer == "pickle":
        bad.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}, protocol=2))
    else:
        torch.save({"state_dict": _Evil(marker)}, bad)
    assert not marker.exists()
    _fails(["eval", str(bad), "--quiet"], capsys, 2, "pickle/torch.save file", "never unpickles")
    with pytest.raises(CheckpointError, match="never unpickles"):
        phalanx.load_run(bad)
    from phalanx.checkpoint import read_checkpoint
    renamed = tmp_path / "epoch_0001.json"
    renamed.write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_checkpoint(renamed)
    assert not marker.exists()


def test_a_pickle_dropped_into_a_run_is_never_read(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    ckpts = trained_run / "checkpoints"
    (ckpts / "epoch_0009.pt").write_bytes(pickle.dumps(_Evil(marker)))
    (ckpts / "epoch_0009.json").write_bytes(pickle.dumps(_Evil(marker)))
    (ckpts / "epoch_0009.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    assert latest_checkpoint(ckpts).meta["epoch"] == 1
    phalanx.load_run(trained_run)
    assert not marker.exists()


# The other loaders' malicious files are tested where the loaders live: a CIFAR-10 python batch
# whose pickle calls os.system or eval (tests/data/test_data_loading.py::
# test_malicious_pickle_is_refused_without_running_it), and tar archives with a path-traversal
# member or a symlink member (::test_tar_path_traversal_and_links_are_refused), both through
# load_dataset and both checking that no marker file is created.


# --- failures during a run ---------------------------------------------------------------------------

def test_a_full_disk_while_writing_a_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "quickstart/baseline", "--out", str(out), *TINY, "--set", "train.epochs=2"]
    real_fsync = os.fsync
    ckpts = out / "checkpoints"

    def fsync_disk_full(fd):
        # the disk fills once the first checkpoint is written: every later temporary file fails
        if ckpts.is_dir() and checkpoint_records(ckpts) and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_disk_full)
    _fails(argv, capsys, 1, "could not write", "epoch_0002.safetensors", "No space left on device")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.name for p in checkpoint_records(ckpts)] == ["epoch_0001.json"]
    assert latest_checkpoint(ckpts).meta["epoch"] == 1
    assert not (ckpts / "epoch_0002.safetensors").exists()
    _no_partial_files(out)
    assert main(argv) == 0  # space freed: the same command resumes and finishes
    assert latest_checkpoint(ckpts).meta["epoch"] == 2


def test_a_nan_loss_stops_with_epoch_and_step(tmp_path, capsys, monkeypatch):
    from phalanx.train.baseline import Baseline

    real_loss = Baseline.loss
    seen = {"n": 0}

    def poisoned(self, members, batch, rng):
        out = real_loss(self, members, batch, rng)
        seen["n"] += 1
        if seen["n"] == 3:  # epoch 2 (2 batches per epoch), step 1
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Baseline, "loss", poisoned)
    out = tmp_path / "run"
    _fails(["train", "quickstart/baseline", "--out", str(out), *TINY, "--set", "train.epochs=2"], capsys, 1,
           "loss became nan at epoch 2, step 1", "last good checkpoint is kept")
    assert latest_checkpoint(out / "checkpoints").meta["epoch"] == 1
    _no_partial_files(out)
