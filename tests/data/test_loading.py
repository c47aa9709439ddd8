"""load_dataset on small generated files in every official format, and its refusals."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx.data import (
    DataError, DatasetName, NoncanonicalDataWarning, dataset_info, display_name, load_dataset, load_split,
)
from phalanx.data import formats

pytestmark = pytest.mark.usefixtures("small_sizes")


def _mnist(datafiles, folder: Path, split: str = "train", seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray, tuple[Path, Path]]:
    rng = np.random.default_rng(seed)
    n = 6 if split == "train" else 4
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    return images, labels, datafiles.write_idx(folder, split, images, labels)


# --- names, info, digits -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["cifar1000", "MNIST", "", "folder"])
def test_unknown_dataset_is_refused_with_the_allowed_names(bad: str) -> None:
    message = rf"unknown dataset '{bad}'.*'digits'.*'cifar10'.*'cifar100'.*'svhn'.*'image-folder'"
    with pytest.raises(DataError, match=message):
        load_dataset(bad, "train")


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'val'.*'train', 'test'"):
        load_dataset("digits", "val")


def test_dataset_info_accepts_strings_and_enums() -> None:
    info = dataset_info("cifar10")
    assert info is dataset_info(DatasetName.CIFAR10)
    assert (info.spec.channels, info.spec.size, info.spec.num_classes) == (3, 32, 10)
    assert len(info.class_names) == 10 and info.display_name == "CIFAR-10"
    assert dataset_info("digits").spec.size == 16
    with pytest.raises(DataError, match="unknown dataset 'stl10'"):
        dataset_info("stl10")


def test_digits_needs_no_root_and_is_upsampled_by_nearest_neighbour() -> None:
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset(DatasetName.DIGITS, "test")
    assert x.shape == (1437, 1, 16, 16) and xt.shape == (360, 1, 16, 16)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    assert torch.equal(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])  # 2x2 blocks are constant
    assert torch.equal(x[:, :, ::2, ::2], x[:, :, 1::2, ::2])
    # every value is one of the 17 levels round(v * 255 / 16)
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(x.unique().tolist()) <= levels


@pytest.mark.integration  # runs phalanx in a subprocess
def test_the_runtime_does_not_import_sklearn() -> None:
    code = ("import sys, phalanx.data as d; d.load_dataset('digits', 'test'); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- MNIST / Fashion-MNIST idx ---------------------------------------------------------------------

def test_idx_loads_from_the_folder_and_from_a_parent(datafiles, tmp_path: Path, bless) -> None:
    images, labels, files = _mnist(datafiles, tmp_path / "mnist")
    bless(DatasetName.MNIST, *files)
    for root in (tmp_path / "mnist", tmp_path):
        x, y = load_dataset("mnist", "train", root)
        assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_parent_lookup_picks_the_named_subfolder(datafiles, tmp_path: Path, bless) -> None:
    _, _, mnist_files = _mnist(datafiles, tmp_path / "mnist", seed=1)
    images, labels, files = _mnist(datafiles, tmp_path / "fashion-mnist", seed=2)
    bless(DatasetName.FASHION_MNIST, *files)
    bless(DatasetName.MNIST, *mnist_files)
    x, y = load_dataset("fashion-mnist", "train", tmp_path)
    assert np.array_equal(x[:, 0].numpy(), images)
    x, _ = load_dataset("mnist", "train", tmp_path)
    assert not np.array_equal(x[:, 0].numpy(), images)


def test_default_root_is_phalanx_data(datafiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      bless) -> None:
    images, _, files = _mnist(datafiles, tmp_path / "mnist", "test")
    bless(DatasetName.MNIST, *files)
    monkeypatch.setenv("PHALANX_DATA", str(tmp_path))
    x, _ = load_dataset("mnist", "test")
    assert np.array_equal(x[:, 0].numpy(), images)


def test_md5_mismatch_is_refused_unless_allowed(datafiles, tmp_path: Path) -> None:
    images, _, (image_file, _) = _mnist(datafiles, tmp_path)
    message = rf"{image_file.name} has md5 .*canonical f68b3c2d.*allow_noncanonical=True"
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", "train", tmp_path)
    with pytest.warns(NoncanonicalDataWarning, match="not the canonical files"):
        loaded = load_split("mnist", "train", tmp_path, allow_noncanonical=True)
    assert np.array_equal(loaded.images[:, 0].numpy(), images)
    # the loader says which copy it read (tables print it), not only the warning text
    assert loaded.copy == "non-canonical copy"
    assert display_name("mnist", copy=loaded.copy) == "MNIST (non-canonical copy)"


def _corrupt(which: str, image_file: Path, label_file: Path) -> Path:
    raw_images = gzip.decompress(image_file.read_bytes())
    raw_labels = gzip.decompress(label_file.read_bytes())
    if which == "truncated":
        image_file.write_bytes(gzip.compress(raw_images[:-100]))
    elif which == "magic":
        image_file.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw_images[4:]))
    elif which == "gzip":
        image_file.write_bytes(image_file.read_bytes()[:40])
    elif which == "label":
        label_file.write_bytes(gzip.compress(raw_labels[:-1] + bytes([10])))
        return label_file
    elif which == "count":
        label_file.write_bytes(gzip.compress(raw_labels[:4] + (5).to_bytes(4, "big") + raw_labels[8:-1]))
        return label_file
    return image_file


@pytest.mark.parametrize("which, message", [
    ("truncated", "truncated"), ("magic", "magic number 0x00000801, expected 0x00000803"),
    ("gzip", "not a valid gzip file"), ("label", "label 10 at index 5.*0..9"),
    ("count", "5 labels, expected 6"),
])
def test_damaged_idx_files_are_refused_naming_the_file(datafiles, tmp_path: Path, bless, which: str,
                                                       message: str) -> None:
    _, _, files = _mnist(datafiles, tmp_path)
    bad = _corrupt(which, *files)
    bless(DatasetName.MNIST, *files)
    with pytest.raises(DataError, match=rf"{bad.name}.*{message}"):
        load_dataset("mnist", "train", tmp_path)


def test_missing_files_say_where_they_were_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist test: found none of t10k-images.*download=True"):
        load_dataset("mnist", "test", tmp_path)


# --- CIFAR-10: binary and python versions, folders and archives --------------------------------------

@pytest.mark.parametrize("python", [False, True], ids=["binary", "python"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_archive_and_folder_give_the_same_arrays(datafiles, tmp_path: Path, bless, python: bool,
                                                       split: str) -> None:
    members, expected = datafiles.cifar_members(python)
    archive_name = "cifar-10-python.tar.gz" if python else "cifar-10-binary.tar.gz"
    archive = datafiles.write_tar(tmp_path / "archive" / "cifar10" / archive_name, members)
    datafiles.write_tree(tmp_path / "tree", members)
    folder = next((tmp_path / "tree").iterdir())
    bless(DatasetName.CIFAR10, archive, *folder.iterdir())
    roots = [archive, tmp_path / "archive", tmp_path / "archive" / "cifar10", tmp_path / "tree", folder]
    for root in roots:
        # the extracted binary files have no published md5: they load with a warning, the rest silently
        unverifiable = not python and root in (tmp_path / "tree", folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_split("cifar10", split, root)
        x, y = loaded.images, loaded.labels
        assert [w.category for w in caught] == ([NoncanonicalDataWarning] if unverifiable else []), root
        assert loaded.copy == ("non-canonical copy" if unverifiable else None), root
        assert x.dtype == torch.uint8 and x.shape == (len(expected[split][1]), 3, 32, 32), root
        assert np.array_equal(x.numpy(), expected[split][0]) and np.array_equal(y.numpy(), expected[split][1])


def test_cifar_archive_md5_mismatch_is_refused_unless_allowed(datafiles, tmp_path: Path) -> None:
    members, _ = datafiles.cifar_members(False)
    datafiles.write_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz has md5 .*canonical c32a1d4a"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.warns(NoncanonicalDataWarning, match="not the canonical"):
        load_dataset("cifar10", "test", tmp_path, allow_noncanonical=True)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"test_batch.bin: 9000 bytes, expected 3 records of 3073 bytes"),
    ("label", r"test_batch.bin: label 12 at index 0"),
])
def test_damaged_cifar_binary_is_refused(datafiles, tmp_path: Path, damage: str, message: str) -> None:
    members, _ = datafiles.cifar_members(False)
    raw = members["cifar-10-batches-bin/test_batch.bin"]
    damaged = raw[:9000] if damage == "truncate" else bytes([12]) + raw[1:]
    members["cifar-10-batches-bin/test_batch.bin"] = damaged
    datafiles.write_tree(tmp_path, members)
    with pytest.warns(NoncanonicalDataWarning), pytest.raises(DataError, match=message):
        load_dataset("cifar10", "test", tmp_path)


def test_damaged_cifar_python_batch_is_refused(datafiles, tmp_path: Path, bless) -> None:
    members, _ = datafiles.cifar_members(True)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                              b"labels": [0, 1]}, protocol=2)
    datafiles.write_tree(tmp_path, members)
    bless(DatasetName.CIFAR10, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match=r"test_batch: 'data' is ndarray uint8 of shape \(2, 3072\)"):
        load_dataset("cifar10", "test", tmp_path)


class _Evil:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_without_running_it(datafiles, tmp_path: Path, bless,
                                                        payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil(os.system, f"touch {marker}") if payload == "system" else \
        _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    members, _ = datafiles.cifar_members(True)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2)
    datafiles.write_tree(tmp_path, members)
    bless(DatasetName.CIFAR10, tmp_path / "cifar-10-batches-py" / "test_batch")
    message = r"test_batch: the pickle asks for (posix|os|nt|builtins|__builtin__)\.(system|eval)"
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_rebuilds_numpy_arrays_only() -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        raw = pickle.dumps({"a": array, "b": [1, "x", b"y"]}, protocol=protocol)
        out = formats.restricted_loads(raw, "t")
        assert np.array_equal(out["a"], array) and out["b"] == [1, "x", b"y"]
    with pytest.raises(DataError, match="collections.OrderedDict, which is not allowed"):
        formats.restricted_loads(pickle.dumps(__import__("collections").OrderedDict()), "t")
    with pytest.raises(DataError, match="not a readable pickle"):
        formats.restricted_loads(b"\x80\x02garbage", "t")


def test_tar_path_traversal_and_links_are_refused(datafiles, tmp_path: Path, bless) -> None:
    members, _ = datafiles.cifar_members(False)
    outside = tarfile.TarInfo("cifar-10-batches-bin/../../escape.txt")
    outside.size = 3
    archive = datafiles.write_tar(tmp_path / "a" / "cifar-10-binary.tar.gz", members, extra=[outside])
    bless(DatasetName.CIFAR10, archive)
    with pytest.raises(DataError, match=r"escape.txt' points outside the archive"):
        load_dataset("cifar10", "test", archive)
    assert not (tmp_path / "escape.txt").exists()

    link = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    del members["cifar-10-batches-bin/test_batch.bin"]
    archive = datafiles.write_tar(tmp_path / "b" / "cifar-10-binary.tar.gz", members, extra=[link])
    bless(DatasetName.CIFAR10, archive)
    with pytest.raises(DataError, match=r"test_batch.bin' is a link or special file"):
        load_dataset("cifar10", "test", archive)


def test_truncated_archive_is_refused(datafiles, tmp_path: Path, bless) -> None:
    members, _ = datafiles.cifar_members(False)
    archive = datafiles.write_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    bless(DatasetName.CIFAR10, archive)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: not a readable tar archive"):
        load_dataset("cifar10", "test", tmp_path)
