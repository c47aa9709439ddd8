"""Small files in each official format (written the way the official ones are), and fixtures:
small expected split sizes, and `bless` to declare generated files canonical for a test.

Tests reach the helpers through the `datafiles` fixture (this module), as pytest runs with
--import-mode=importlib and test helpers cannot be imported by name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import sys
import tarfile
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from phalanx.data import DatasetName, registry

CIFAR_RECORDS = 3  # per batch in these tests (10000 in the real files)
CIFAR100_SIZES = {"train": 4, "test": 3}  # one batch per split (50000 and 10000 in the real files)
SVHN_SIZES = {"train": 5, "test": 3}  # 73257 and 26032 in the real files


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """The two idx `.gz` files of `split` (images uint8 N x H x W, labels N)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_name, label_name = registry.IDX_FILES[split]
    n, h, w = images.shape
    header = b"".join(d.to_bytes(4, "big") for d in (0x803, n, h, w))
    image_raw = header + images.tobytes()
    label_header = b"".join(d.to_bytes(4, "big") for d in (0x801, len(labels)))
    label_raw = label_header + labels.astype(np.uint8).tobytes()
    (folder / image_name).write_bytes(gzip.compress(image_raw))
    (folder / label_name).write_bytes(gzip.compress(label_raw))
    return folder / image_name, folder / label_name


def cifar_arrays(batches: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (CIFAR_RECORDS, 3, 32, 32), dtype=np.uint8),
             rng.integers(0, 10, CIFAR_RECORDS).astype(np.int64)) for _ in range(batches)]


def cifar_binary_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    rows = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    return rows.tobytes()


def cifar_python_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch as the python version stores it: a dict with bytes keys, protocol 2."""
    obj = {b"batch_label": b"testing batch", b"labels": [int(v) for v in labels],
           b"data": images.reshape(len(labels), -1), b"filenames": [b"x.png"] * len(labels)}
    return pickle.dumps(obj, protocol=2)


def cifar_members(python: bool, seed: int = 0
                  ) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Member name -> bytes for a whole CIFAR-10 tree, and split -> expected (images, labels)."""
    arrays = cifar_arrays(6, seed)
    folder, suffix = ("cifar-10-batches-py", "") if python else ("cifar-10-batches-bin", ".bin")
    encode = cifar_python_bytes if python else cifar_binary_bytes
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    members = {f"{folder}/{n}{suffix}": encode(*a) for n, a in zip(names, arrays)}
    expected = {
        "train": (np.concatenate([a[0] for a in arrays[:5]]), np.concatenate([a[1] for a in arrays[:5]])),
        "test": arrays[5],
    }
    return members, expected


def cifar100_members(python: bool, seed: int = 0
                     ) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Member name -> bytes for a whole CIFAR-100 tree (one batch per split), and split -> (images,
    fine labels).

    Fine labels include values above 9 (and 99), coarse labels differ from them, so that a reader
    that took the wrong byte or key, or checked against 10 classes, fails.
    """
    rng = np.random.default_rng(seed)
    members, expected = {}, {}
    folder = "cifar-100-python" if python else "cifar-100-binary"
    for split, n in CIFAR100_SIZES.items():
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = np.array([99, 10, 57, 3][:n], dtype=np.int64)
        coarse = fine // 5
        if python:
            obj = {b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                   b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                   b"data": images.reshape(n, -1)}
            members[f"{folder}/{split}"] = pickle.dumps(obj, protocol=2)
        else:
            rows = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None],
                                   images.reshape(n, -1)], axis=1)
            members[f"{folder}/{split}.bin"] = rows.tobytes()
        expected[split] = (images, fine)
    if python:
        members[f"{folder}/meta"] = pickle.dumps({b"fine_label_names": [b"apple"]}, protocol=2)
    else:
        members[f"{folder}/fine_label_names.txt"] = b"apple\n"
    return members, expected


# --- MATLAB v5 .mat files (SVHN) ---------------------------------------------------------------------

_MI = {np.dtype("u1"): 2, np.dtype("f8"): 9, np.dtype("i4"): 5, np.dtype("u4"): 6}
_MX = {np.dtype("u1"): 9, np.dtype("f8"): 6}


def _mat_element(mdtype: int, data: bytes, order: str) -> bytes:
    if len(data) <= 4:  # small data element, as MATLAB writes short names
        word = np.array([(len(data) << 16) | mdtype], dtype=f"{order}u4").tobytes()
        return word + data.ljust(4, b"\0")
    tag = np.array([mdtype, len(data)], dtype=f"{order}u4").tobytes()
    return tag + data + b"\0" * (-len(data) % 8)


def mat_matrix(name: str, array: np.ndarray, *, stored: str | None = None, order: str = "<",
               mx_class: int | None = None) -> bytes:
    """One miMATRIX element: `array` of class `mx_class` (default: its own type's), its values stored
    column-major as `stored` (default: its own type; MATLAB stores a double of small integers as uint8)."""
    stored_dtype = np.dtype(stored or array.dtype).newbyteorder(order)
    mx = _MX[array.dtype] if mx_class is None else mx_class
    body = (_mat_element(6, np.array([mx, 0], dtype=f"{order}u4").tobytes(), order)
            + _mat_element(5, np.array(array.shape, dtype=f"{order}i4").tobytes(), order)
            + _mat_element(1, name.encode("ascii"), order)
            + _mat_element(_MI[np.dtype(stored or array.dtype)],
                           np.asarray(array, dtype=stored_dtype).tobytes(order="F"), order))
    return np.array([14, len(body)], dtype=f"{order}u4").tobytes() + body


def mat_file(elements: list[bytes], *, compress: bool = True, order: str = "<",
             version: int = 0x0100) -> bytes:
    """A MAT v5 file of these miMATRIX elements, each zlib-compressed (miCOMPRESSED) when `compress`."""
    text = b"MATLAB 5.0 MAT-file, written by the phalanx tests".ljust(116, b" ")
    header = text + b"\0" * 8 + version.to_bytes(2, "little" if order == "<" else "big") + \
        (b"IM" if order == "<" else b"MI")
    out = [header]
    for element in elements:
        if compress:
            packed = zlib.compress(element)
            out.append(np.array([15, len(packed)], dtype=f"{order}u4").tobytes() + packed)
        else:
            out.append(element)
    return b"".join(out)


def svhn_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (32 x 32 x 3 x n uint8, as SVHN stores it) and y (n x 1 doubles in 1..10, 10 for the digit 0)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = ((np.arange(n) + 9) % 10 + 1).astype(np.float64)[:, None]  # 10, 1, 2, ...: the first is a 0
    return x, y


def svhn_mat(x: np.ndarray, y: np.ndarray, **kwargs) -> bytes:
    """An SVHN file as MATLAB writes it: X uint8, y a double matrix stored as uint8, both compressed."""
    order = kwargs.get("order", "<")
    return mat_file([mat_matrix("X", x, order=order), mat_matrix("y", y, stored="u1", order=order)], **kwargs)


# --- image folders -----------------------------------------------------------------------------------

def write_image_folder(root: Path, counts: dict[str, dict[str, int]], *, size: int = 16, mode: str = "RGB",
                       suffix: str = ".png", seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`root/<split>/<class>/<i><suffix>` images of random pixels; split -> (N x C x H x W, labels) expected
    (classes in sorted order, files in name order)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    expected = {}
    for split, per_class in counts.items():
        images, labels = [], []
        for label, name in enumerate(sorted(per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[name]):
                shape = (size, size) if mode == "L" else (size, size, 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}{suffix}")  # 2-D: L, 3-D: RGB
                images.append(pixels[None] if mode == "L" else pixels.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, dtype=np.int64))
    return expected


def write_tree(root: Path, members: dict[str, bytes]) -> None:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def write_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expected split sizes small enough for generated files."""
    for name in (DatasetName.MNIST, DatasetName.FASHION_MNIST):
        monkeypatch.setitem(registry.SPLIT_SIZES, (name, "train"), 6)
        monkeypatch.setitem(registry.SPLIT_SIZES, (name, "test"), 4)
    monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.CIFAR10, "train"), 5 * CIFAR_RECORDS)
    monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.CIFAR10, "test"), CIFAR_RECORDS)
    for split in ("train", "test"):
        monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.CIFAR100, split), CIFAR100_SIZES[split])
        monkeypatch.setitem(registry.SPLIT_SIZES, (DatasetName.SVHN, split), SVHN_SIZES[split])


@pytest.fixture
def bless(monkeypatch: pytest.MonkeyPatch):
    """`bless(name, *paths)`: make the current md5 of these files the canonical one for this test."""
    def _bless(name: DatasetName, *paths: Path) -> None:
        table = dict(registry.MD5[name])
        for path in paths:
            table[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
        monkeypatch.setitem(registry.MD5, name, table)
    return _bless


@pytest.fixture
def datafiles() -> ModuleType:
    """The file-writing helpers of this module."""
    return sys.modules[__name__]
