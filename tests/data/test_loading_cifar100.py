"""CIFAR-100 on small generated files in both official versions (binary and python), and its refusals."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx.data import DataError, DatasetName, NoncanonicalDataWarning, dataset_info, load_dataset, registry
from phalanx.data import download as download_module

pytestmark = pytest.mark.usefixtures("small_sizes")


def test_info_has_the_100_fine_classes_in_meta_order() -> None:
    info = dataset_info("cifar100")
    assert (info.spec.channels, info.spec.size, info.spec.num_classes) == (3, 32, 100)
    assert len(info.class_names) == 100 and list(info.class_names) == sorted(info.class_names)
    assert info.class_names[:3] == ("apple", "aquarium_fish", "baby") and info.class_names[-1] == "worm"
    assert info.spec.mean == (0.5071, 0.4865, 0.4409) and info.spec.std == (0.2673, 0.2564, 0.2762)


@pytest.mark.parametrize("python", [False, True], ids=["binary", "python"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_archive_and_folder_give_the_same_arrays_with_fine_labels(datafiles, tmp_path: Path, bless,
                                                                  python: bool, split: str) -> None:
    members, expected = datafiles.cifar100_members(python)
    archive_name = "cifar-100-python.tar.gz" if python else "cifar-100-binary.tar.gz"
    archive = datafiles.write_tar(tmp_path / "archive" / "cifar100" / archive_name, members)
    datafiles.write_tree(tmp_path / "tree", members)
    folder = next((tmp_path / "tree").iterdir())
    bless(DatasetName.CIFAR100, archive, *folder.iterdir())
    roots = [archive, tmp_path / "archive", tmp_path / "archive" / "cifar100", tmp_path / "tree", folder]
    for root in roots:
        # the extracted binary files have no published md5: they load with a warning, the rest silently
        unverifiable = not python and root in (tmp_path / "tree", folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, y = load_dataset("cifar100", split, root)
        assert [w.category for w in caught] == ([NoncanonicalDataWarning] if unverifiable else []), root
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (len(y), 3, 32, 32), root
        assert np.array_equal(x.numpy(), expected[split][0]) and np.array_equal(y.numpy(), expected[split][1])


def test_cifar10_and_cifar100_side_by_side_each_find_their_own(datafiles, tmp_path: Path, bless) -> None:
    members10, expected10 = datafiles.cifar_members(False)
    members100, expected100 = datafiles.cifar100_members(False)
    a10 = datafiles.write_tar(tmp_path / "cifar-10-binary.tar.gz", members10)
    a100 = datafiles.write_tar(tmp_path / "cifar-100-binary.tar.gz", members100)
    bless(DatasetName.CIFAR10, a10)
    bless(DatasetName.CIFAR100, a100)
    assert np.array_equal(load_dataset("cifar10", "test", tmp_path)[0].numpy(), expected10["test"][0])
    assert np.array_equal(load_dataset("cifar100", "test", tmp_path)[0].numpy(), expected100["test"][0])


def test_a_cifar10_archive_given_for_cifar100_is_refused(datafiles, tmp_path: Path) -> None:
    members, _ = datafiles.cifar_members(False)
    archive = datafiles.write_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(DataError, match=r"top folder is 'cifar-10-batches-bin'; expected 'cifar-100-binary'"):
        load_dataset("cifar100", "test", archive)


def test_md5_mismatch_is_refused_unless_allowed(datafiles, tmp_path: Path) -> None:
    members, expected = datafiles.cifar100_members(True)
    datafiles.write_tar(tmp_path / "cifar-100-python.tar.gz", members)
    message = r"cifar-100-python.tar.gz has md5 .*canonical eb9058c3.*allow_noncanonical"
    with pytest.raises(DataError, match=message):
        load_dataset("cifar100", "train", tmp_path)
    with pytest.warns(NoncanonicalDataWarning, match="not the canonical"):
        x, _ = load_dataset("cifar100", "train", tmp_path, allow_noncanonical=True)
    assert np.array_equal(x.numpy(), expected["train"][0])
    # the extracted python version's files have published md5s too
    datafiles.write_tree(tmp_path / "tree", members)
    with pytest.raises(DataError, match=r"cifar-100-python/test has md5 .*canonical f0ef6b0a"):
        load_dataset("cifar100", "test", tmp_path / "tree")


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"test.bin: 9000 bytes, expected 3 records of 3074 bytes = 9222; the file is truncated"),
    ("extra-record", r"test.bin: 12296 bytes, expected 3 records of 3074 bytes"),
    ("fine-label", r"test.bin: label 100 at index 0 \(1 bad in all\); labels must be in 0\.\.99"),
], ids=["truncated", "wrong-record-count", "label-out-of-range"])
def test_damaged_binary_is_refused(datafiles, tmp_path: Path, damage: str, message: str) -> None:
    members, _ = datafiles.cifar100_members(False)
    raw = members["cifar-100-binary/test.bin"]
    damaged = {"truncate": raw[:9000], "extra-record": raw + raw[:3074],
               "fine-label": raw[:1] + bytes([100]) + raw[2:]}[damage]
    members["cifar-100-binary/test.bin"] = damaged
    datafiles.write_tree(tmp_path, members)
    with pytest.warns(NoncanonicalDataWarning), pytest.raises(DataError, match=message):
        load_dataset("cifar100", "test", tmp_path)


def test_coarse_labels_are_not_taken_for_fine_ones(datafiles, tmp_path: Path) -> None:
    members, _ = datafiles.cifar100_members(False)
    raw = bytearray(members["cifar-100-binary/test.bin"])
    raw[0] = 250  # a coarse label out of any range: ignored, the fine one is read
    members["cifar-100-binary/test.bin"] = bytes(raw)
    datafiles.write_tree(tmp_path, members)
    with pytest.warns(NoncanonicalDataWarning):
        _, y = load_dataset("cifar100", "test", tmp_path)
    assert y.tolist() == [99, 10, 57]


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]},
     r"'fine_labels' is NoneType of length \?, expected 3 labels"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 1]},
     r"'fine_labels' is list of length 2, expected 3 labels"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 1, 100]}, r"label 100 at index 2.*0\.\.99"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1, 2]},
     r"'data' is ndarray uint8 of shape \(2, 3072\), expected a uint8 array of shape \(3, 3072\)"),
], ids=["cifar10-keys", "short-labels", "label-out-of-range", "short-data"])
def test_damaged_python_batch_is_refused(datafiles, tmp_path: Path, bless, batch: dict, message: str) -> None:
    members, _ = datafiles.cifar100_members(True)
    members["cifar-100-python/test"] = pickle.dumps(batch, protocol=2)
    datafiles.write_tree(tmp_path, members)
    bless(DatasetName.CIFAR100, tmp_path / "cifar-100-python" / "test")
    with pytest.raises(DataError, match=rf"cifar-100-python/test: {message}"):
        load_dataset("cifar100", "test", tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(datafiles, tmp_path: Path, bless) -> None:
    marker = tmp_path / "pwned"
    members, _ = datafiles.cifar100_members(True)
    evil = {b"data": _Evil(marker), b"fine_labels": [0]}
    members["cifar-100-python/train"] = pickle.dumps(evil, protocol=2)
    archive = datafiles.write_tar(tmp_path / "cifar-100-python.tar.gz", members)
    bless(DatasetName.CIFAR100, archive)
    with pytest.raises(DataError, match=r"cifar-100-python/train: the pickle asks for (posix|os|nt)\.system"):
        load_dataset("cifar100", "train", tmp_path)
    assert not marker.exists()


def test_missing_files_name_both_versions(tmp_path: Path) -> None:
    message = (r"cifar100 test: found none of cifar-100-binary/ or cifar-100-python/ "
               r"\(with test\[\.bin\]\), or cifar-100-binary.tar.gz or cifar-100-python")
    with pytest.raises(DataError, match=message):
        load_dataset("cifar100", "test", tmp_path)


def test_download_fetches_the_binary_archive_and_verifies_it(datafiles, tmp_path: Path, bless,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    members, expected = datafiles.cifar100_members(False)
    archive = datafiles.write_tar(tmp_path / "source" / "cifar-100-binary.tar.gz", members)
    assert registry.MIRRORS[DatasetName.CIFAR100] == ("https://www.cs.toronto.edu/~kriz/",)
    served = archive.read_bytes()
    requested = []

    def urlopen(url: str, timeout: float):
        requested.append(url)
        return _Response(served)

    monkeypatch.setattr(download_module.urllib.request, "urlopen", urlopen)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"could not download cifar-100-binary.tar.gz: .*expected 03b5dce0"):
        load_dataset("cifar100", "test", root, download=True)
    assert [p for p in root.rglob("*") if p.is_file()] == []
    bless(DatasetName.CIFAR100, archive)
    x, y = load_dataset("cifar100", "test", root, download=True)
    assert requested[-1] == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    assert np.array_equal(x.numpy(), expected["test"][0]) and y.tolist() == [99, 10, 57]


class _Response:
    def __init__(self, data: bytes) -> None:
        self.data, self.headers = data, {"Content-Length": str(len(data))}

    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, size: int = -1) -> bytes:
        out, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return out
