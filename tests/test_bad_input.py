"""Every bad input answered (docs/reliability.md): one test per row of the table, through the CLI.

Usage errors exit 2, failed runs exit 1; either way one line `phalanx: error: ...` on stderr,
no traceback, and no partial file (`*.tmp`) left in the run directory.
"""

import errno
import json
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
from phalanx.files import seal

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
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, "does not match the checkpoint", "model.arch = 'conv3'")
    assert not (trained_run / "eval").exists()
    for record in (trained_run / "checkpoints").glob("*.json"):  # a run of an older phalanx: weights compared
        meta = json.loads(record.read_text())
        del meta["fingerprint"], meta["config"], meta["arch"], meta["sha256"]
        record.write_text(json.dumps(meta))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, "member 0 does not match", "another architecture")


def test_a_checkpoint_of_another_dataset(trained_run, capsys, tmp_path):
    path = trained_run / "config.yaml"
    path.write_text(path.read_text().replace("dataset: digits", "dataset: mnist"))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, "does not match the checkpoint", "data.dataset = 'mnist'")


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
# whose pickle calls os.system or eval (tests/data/test_loading.py::
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


# --- nothing lost, nothing silently wrong (issue 13) ----------------------------------------------------

def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "checkpoints" / "epoch_0001.safetensors").write_bytes(b"my own tensors")
    (folder / ".draft.json.abcd1234.tmp").write_text("my draft")  # looks like phalanx's own temporary name
    before = _snapshot(folder)
    _fails(["train", "quickstart/baseline", "--out", str(folder), *TINY], capsys, 2,
           str(folder), "not a phalanx run", "empty")
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == [
        ".draft.json.abcd1234.tmp", "checkpoints", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "quickstart/baseline", "--out", str(empty), *TINY]) == 0  # an empty folder is fine


def test_a_run_whose_config_is_missing_is_not_adopted(trained_run, capsys):
    (trained_run / "config.yaml").unlink()
    before = _snapshot(trained_run)
    _fails(["train", "quickstart/baseline", "--out", str(trained_run), *TINY, "--set", "optim.lr=0.5"], capsys, 2,
           str(trained_run), "not a phalanx run")
    assert _snapshot(trained_run) == before


def test_a_refused_resume_keeps_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "quickstart/baseline", "--out", str(run), *TINY, "--set", "train.epochs=2"]
    assert main(argv) == 0
    capsys.readouterr()
    for record in (run / "checkpoints").glob("epoch_*.json"):  # impossible values in every checkpoint
        meta = json.loads(record.read_text())
        meta["epoch"] = -5
        record.write_text(json.dumps(meta))
    before = (run / "metrics.jsonl").read_bytes()
    _fails(argv, capsys, 2, "epoch", "every checkpoint", str(run / "checkpoints"))
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_damaged_newest_checkpoint_is_reported(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "quickstart/baseline", "--out", str(run), *TINY, "--set", "train.epochs=2"]
    assert main(argv) == 0
    capsys.readouterr()
    blob = run / "checkpoints" / "epoch_0002.safetensors"
    blob.write_bytes(blob.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=r"epoch_0002\.json.*damaged.*epoch 1"):
        assert main(["eval", str(run), "--quiet", "--attack", "fgsm", "--examples", "8"]) == 0
    assert json.loads((run / "eval" / "whitebox.json").read_text())["epoch"] == 1
    with pytest.warns(UserWarning, match=r"epoch_0002\.json.*damaged.*epoch 1"):
        assert main(argv) == 0  # resume retrains epoch 2, saying so
    for record in (run / "checkpoints").glob("epoch_*.safetensors"):
        record.write_bytes(b"garbage")
    _fails(argv, capsys, 2, "every checkpoint", "damaged")  # never a silent restart from zero


@pytest.mark.parametrize("edit, key", [
    (("train_subset: 128", "train_subset: 64"), "data.train_subset"),
    (("dataset: digits", "dataset: mnist"), "data.dataset"),
    (("arch: conv\n", "arch: conv3\n"), "model.arch"),
], ids=["subset", "dataset", "arch"])
def test_an_edited_config_is_refused_naming_the_key(trained_run, capsys, edit, key):
    path = trained_run / "config.yaml"
    path.write_text(path.read_text().replace(*edit))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, key, "config.yaml", "epoch_0001.json")
    with pytest.raises(CheckpointError, match=key):
        phalanx.load_run(trained_run)
    assert not (trained_run / "eval").exists()


def test_eval_settings_in_config_may_change(trained_run, capsys):
    path = trained_run / "config.yaml"
    path.write_text(path.read_text().replace("examples: 32", "examples: 16").replace("name: quickstart", "name: renamed"))
    phalanx.load_run(trained_run)


def test_a_run_from_before_fingerprints_still_loads(trained_run):
    for record in (trained_run / "checkpoints").glob("epoch_*.json"):
        meta = json.loads(record.read_text())
        for key in ("fingerprint", "config", "classes", "input_shape", "sha256"):
            meta.pop(key, None)
        record.write_text(json.dumps(meta))
    assert len(phalanx.load_run(trained_run)) == 2


@pytest.mark.parametrize("change, message", [
    ("model.members=3", "model.members"),
    ("model.arch=conv3", "model.arch"),
    ("data.dataset=mnist", "data.dataset"),
], ids=["members", "arch", "dataset"])
def test_init_from_of_another_shape_is_refused_before_writing(trained_run, tmp_path, capsys, change, message):
    child = tmp_path / "child"
    _fails(["train", "quickstart/baseline", "--out", str(child), *TINY, "--set", change,
            "--set", f"train.init_from={trained_run}"], capsys, 2, "train.init_from", message, str(trained_run))
    assert not child.exists()


def test_init_from_that_is_not_a_run_is_refused_before_writing(tmp_path, capsys):
    child = tmp_path / "child"
    _fails(["train", "quickstart/baseline", "--out", str(child), *TINY, "--set", f"train.init_from={tmp_path}/nope"],
           capsys, 2, "train.init_from", "nope")
    assert not child.exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "optim.lr=.inf"], "optim.lr = inf is not allowed"),
    (["--set", "optim.lr=.nan"], "optim.lr = nan is not allowed"),
    (["--set", "optim.momentum=.nan"], "optim.momentum = nan is not allowed"),
    (["--set", "train.method=dverge", "--set", "method.distill.eps=.inf"], "distill.eps = inf is not allowed"),
    (["--set", "train.method=dverge", "--set", "method.distill.eps=5"], "distill.eps = 5"),
    (["--set", "train.method=dverge", "--set", "method.distill.eps=0"], "distill.eps = 0"),
    (["--set", "seed=100000000000000000000"], "seed = 100000000000000000000 is not allowed"),
    (["--set", "seed=-1"], "seed = -1 is not allowed"),
    (["--set", "name=../../escape"], "name = '../../escape' is not allowed"),
    (["--set", "train.method=magic"], "train.method = 'magic'"),
], ids=["inf-lr", "nan-lr", "nan-momentum", "inf-distill-eps", "distill-eps-5", "distill-eps-0", "huge-seed",
        "negative-seed", "name-escapes", "unknown-method"])
def test_values_not_allowed_are_refused_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    line = _fails(["train", "quickstart/baseline", "--out", str(out), *TINY, *argv], capsys, 2, message)
    assert "expected" in line
    assert not out.exists()


def test_a_refused_train_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(_mnist_argv(tmp_path / "empty", out), capsys, 2, "found none of")
    assert not out.exists()
    _fails(["train", "quickstart/baseline", "--out", str(out), *TINY, "--set", "train.batch_size=100000"], capsys, 2,
           "larger than the training set")
    assert not out.exists()


def _binary_config(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    return path


@pytest.mark.parametrize("case", [
    "set-malformed-yaml", "set-no-value", "unknown-device-train", "unknown-device-eval", "invalid-config",
    "binary-config", "run-config-invalid", "run-config-binary", "meta-missing-field", "meta-mistyped-field",
    "malformed-safetensors", "transfer-set-truncated",
])
def test_no_traceback_reaches_the_user(trained_run, tmp_path, capsys, case):
    """Each class of bad input of issue 13: one line `phalanx: error: ...` naming the value or file."""
    train = ["train", "quickstart/baseline", "--out", str(tmp_path / "new"), *TINY]
    ckpt = trained_run / "checkpoints" / "epoch_0001.json"
    if case == "set-malformed-yaml":
        _fails([*train, "--set", "train.epochs=[1"], capsys, 2, "--set", "train.epochs=[1")
    elif case == "set-no-value":
        _fails([*train, "--set", "train.epochs"], capsys, 2, "--set", "KEY.PATH=VALUE")
    elif case == "unknown-device-train":
        _fails([*train, "--set", "device=tpu"], capsys, 2, "device = 'tpu' is not allowed")
    elif case == "unknown-device-eval":
        _fails(["eval", str(trained_run), "--quiet", "--device", "tpu"], capsys, 2, "tpu", "auto, cpu, cuda or cuda:N")
    elif case == "invalid-config":
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: {epochs: [1\n")
        _fails(["train", str(bad), "--out", str(tmp_path / "new")], capsys, 2, str(bad), "not valid YAML")
    elif case == "binary-config":
        bad = _binary_config(tmp_path)
        _fails(["train", str(bad), "--out", str(tmp_path / "new")], capsys, 2, str(bad))
    elif case == "run-config-invalid":
        (trained_run / "config.yaml").write_text("model: {arch: [\n")
        _fails(["eval", str(trained_run), "--quiet"], capsys, 2, str(trained_run / "config.yaml"))
    elif case == "run-config-binary":
        (trained_run / "config.yaml").write_bytes(_binary_config(tmp_path).read_bytes())
        _fails(["eval", str(trained_run), "--quiet"], capsys, 2, str(trained_run / "config.yaml"))
    elif case in ("meta-missing-field", "meta-mistyped-field"):
        meta = json.loads(ckpt.read_text())
        if case == "meta-missing-field":
            del meta["epoch"]
        else:
            meta["members"] = "two"
        ckpt.write_text(json.dumps(meta))
        _fails(["eval", str(trained_run), "--quiet"], capsys, 2, str(ckpt))
    elif case == "malformed-safetensors":
        import hashlib
        blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"
        ckpt.with_suffix(".safetensors").write_bytes(blob)
        meta = json.loads(ckpt.read_text())
        meta.update(tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
        del meta["sha256"]
        ckpt.write_text(json.dumps(seal(meta)))  # a record that matches the bad tensors
        _fails(["eval", str(trained_run), "--quiet"], capsys, 2, str(ckpt))
    elif case == "transfer-set-truncated":
        argv = ["eval", str(trained_run), "--quiet", "--transfer-from", str(trained_run), "--attack", "fgsm",
                "--examples", "8", "--transfer-dir", str(tmp_path / "sets")]
        assert main(argv) == 0
        capsys.readouterr()
        (path,) = (tmp_path / "sets").glob("*.safetensors")
        path.write_bytes(path.read_bytes()[:-100])
        from phalanx.eval.transfer import evaluate_transfer
        with pytest.raises(ValueError, match=f"{path}.*damaged"):
            evaluate_transfer(trained_run, path)
        with pytest.warns(UserWarning, match=f"{path}.*damaged.*recraft"):
            assert main(argv) == 0  # a damaged cached set is recrafted, saying so
        from phalanx.eval.transfer import load_transfer_set
        load_transfer_set(path)


def test_a_flipped_byte_in_a_transfer_set_is_refused(trained_run, tmp_path):
    from phalanx.eval.transfer import craft_transfer_set, load_transfer_set
    from phalanx.attacks import AttackSpec
    path = craft_transfer_set([trained_run], [AttackSpec("fgsm", 0.1)], examples=8, seed=0, out_path=tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*damaged.*delete"):
        load_transfer_set(path)


def test_leftover_temporary_files_are_cleaned_but_not_live_ones_or_the_users(trained_run, capsys):
    import fcntl
    eval_dir = trained_run / "eval"
    eval_dir.mkdir()
    stale = eval_dir / ".whitebox.json.k3j4h5g6.tmp"  # a write killed before its rename
    stale.write_text("{partial")
    other = eval_dir / ".transfer.json.a1b2c3d4.tmp"
    other.write_text("{partial")
    live = eval_dir / ".analysis.json.z9y8x7w6.tmp"  # another process writing right now
    live.write_text("{in progress")
    users = [eval_dir / "mine.tmp", eval_dir / ".mine.tmp", eval_dir / "notes.json"]
    for path in users:
        path.write_text("mine")
    old = os.path.getmtime(stale) - 60
    for path in (stale, other, live):
        os.utime(path, (old, old))
    with open(live) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert main(["eval", str(trained_run), "--quiet", "--attack", "fgsm", "--examples", "8"]) == 0
    assert not stale.exists() and not other.exists()
    assert live.exists() and all(p.read_text() == "mine" for p in users)


def test_a_live_run_is_marked_and_eval_says_which_epoch(trained_run, capsys):
    from phalanx.runs import locked
    with locked(trained_run):
        assert (trained_run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.warns(UserWarning, match=r"being trained.*process \d+.*epoch 1"):
            assert main(["eval", str(trained_run), "--quiet", "--attack", "fgsm", "--examples", "8"]) == 0
        with pytest.warns(UserWarning, match=r"being trained.*process \d+.*epoch 1"):
            assert main(["report", str(trained_run)]) == 0


# --- files phalanx wrote, changed afterwards ----------------------------------------------------

def _edit_json(path, **changes):
    """Change values of a JSON document phalanx wrote, keeping its (now stale) checksum."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_changed_metrics_line_is_skipped_by_name_and_the_resume_refused(trained_run, capsys):
    from phalanx.files import DamagedFileWarning
    from phalanx.runs import read_metrics
    path = trained_run / "metrics.jsonl"
    record = json.loads(path.read_text())
    record["val_mixture_acc"] = 1 - record["val_mixture_acc"]
    path.write_text(json.dumps(record) + "\n")
    before = path.read_bytes()
    _fails(["train", "quickstart/baseline", "--out", str(trained_run), *TINY], capsys, 2,
           f"line 1 of {path} is damaged", "sha256", "refusing to resume")
    assert path.read_bytes() == before
    with pytest.warns(DamagedFileWarning, match=f"line 1 of {path} is damaged.*skipped"):
        assert read_metrics(trained_run) == []
    with pytest.warns(DamagedFileWarning, match=f"line 1 of {path}.*left out of the report"):
        assert main(["report", str(trained_run)]) == 0
    assert "1 unreadable line(s) of metrics.jsonl skipped" in (trained_run / "report.md").read_text()


def test_changed_evaluation_analysis_and_checkpoint_files_are_reported_by_name(trained_run, tmp_path, capsys):
    from phalanx.eval.transfer import load_transfer_set
    from phalanx.files import DamagedFileWarning, write_json_atomic
    from phalanx.report.run_data import read_run_data
    assert main(["eval", str(trained_run), "--quiet", "--attack", "fgsm", "--examples", "8"]) == 0
    whitebox = trained_run / "eval" / "whitebox.json"
    _edit_json(whitebox, epoch=7)
    analysis = trained_run / "analysis" / "gradients.json"
    write_json_atomic(analysis, {"kind": "gradient-alignment", "coherence": [0.5, 0.25]})
    _edit_json(analysis, coherence=[0.5, 0.75])
    with pytest.warns(DamagedFileWarning) as caught:
        data = read_run_data(trained_run)
    messages = " | ".join(str(w.message) for w in caught)
    assert f"{whitebox} is damaged" in messages and "left out of the report" in messages
    assert f"{analysis} is damaged" in messages and "gradient-alignment figures skipped" in messages
    assert data.evals == [] and data.analysis is None
    # transfer: the white-box cross-check is skipped with a warning; a changed sidecar is recrafted
    argv = ["eval", str(trained_run), "--quiet", "--transfer-from", str(trained_run), "--attack", "fgsm",
            "--examples", "8", "--transfer-dir", str(tmp_path / "sets")]
    with pytest.warns(DamagedFileWarning, match=f"{whitebox} is damaged.*'white-box not above transfer' is skipped"):
        assert main(argv) == 0
    (path,) = (tmp_path / "sets").glob("*.safetensors")
    _edit_json(path.with_suffix(".json"), seed=5)
    with pytest.raises(ValueError, match=f"{path} is damaged: its sidecar .* does not match its sha256"):
        load_transfer_set(path)
    with pytest.warns(UserWarning, match=f"{path} is damaged.*recrafting it"):
        assert main(argv) == 0
    load_transfer_set(path)
    # a checkpoint record whose checksum fails is damaged (the only one here: refused by name)
    (record,) = (trained_run / "checkpoints").glob("epoch_*.json")
    meta = json.loads(record.read_text())
    meta["optimizer"]["param_groups"][0]["lr"] *= 10
    record.write_text(json.dumps(meta))
    _fails(["eval", str(trained_run), "--quiet"], capsys, 2, str(record), "sha256")


def test_files_written_before_checksums_are_read_unverified(trained_run, recwarn):
    from phalanx.files import read_json
    from phalanx.runs import read_metrics
    assert main(["eval", str(trained_run), "--quiet", "--attack", "fgsm", "--examples", "8"]) == 0
    metrics = trained_run / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sha256"}) + "\n" for r in lines))
    for path in [trained_run / "eval" / "whitebox.json", *(trained_run / "checkpoints").glob("epoch_*.json")]:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}))
    recwarn.clear()
    assert [r["epoch"] for r in read_metrics(trained_run)] == [1]
    assert read_json(trained_run / "eval" / "whitebox.json")["epoch"] == 1
    assert len(phalanx.load_run(trained_run)) == 2
    assert main(["train", "quickstart/baseline", "--out", str(trained_run), *TINY]) == 0  # resumes (nothing to do)
    assert not [w for w in recwarn if "damaged" in str(w.message)]
