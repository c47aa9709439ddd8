"""download=True against a fake network: mirrors, md5 verification, atomic writes, no partial files."""

from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from phalanx.data import DataError, DatasetName, load_dataset, registry
from phalanx.data import download as download_module

pytestmark = pytest.mark.usefixtures("small_sizes")


class _Response(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def _serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes],
           fail_after: int | None = None) -> list[str]:
    """Patch urlopen: URLs under http://down/ fail, URLs under http://up/ serve `files` by name."""
    requested: list[str] = []

    def urlopen(url: str, timeout: float) -> _Response:
        requested.append(url)
        if url.startswith("http://down/"):
            raise urllib.error.URLError("name or service not known")
        return _Response(files[url.rsplit("/", 1)[1]], fail_after)

    monkeypatch.setattr(download_module.urllib.request, "urlopen", urlopen)
    return requested


def _mnist_files(datafiles, tmp_path: Path) -> tuple[dict[str, bytes], np.ndarray]:
    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    datafiles.write_idx(source, "test", images, rng.integers(0, 10, 4))
    train_images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    datafiles.write_idx(source, "train", train_images, rng.integers(0, 10, 6))
    return {p.name: p.read_bytes() for p in source.iterdir()}, images


def test_download_tries_mirrors_verifies_and_loads(datafiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   bless) -> None:
    files, images = _mnist_files(datafiles, tmp_path)
    bless(DatasetName.MNIST, *(tmp_path / "source").iterdir())
    monkeypatch.setitem(registry.MIRRORS, DatasetName.MNIST, ("http://down/", "http://up/"))
    requested = _serve(monkeypatch, files)
    root = tmp_path / "root"
    x, _ = load_dataset("mnist", "test", root, download=True)
    assert np.array_equal(x[:, 0].numpy(), images)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(files)
    assert requested[:2] == ["http://down/train-images-idx3-ubyte.gz", "http://up/train-images-idx3-ubyte.gz"]
    requested.clear()
    load_dataset("mnist", "train", root, download=True)
    assert requested == []  # already there: nothing fetched


def test_checksum_mismatch_leaves_no_file_behind(datafiles, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    members, _ = datafiles.cifar_members(False)
    archive = datafiles.write_tar(tmp_path / "source" / "cifar-10-binary.tar.gz", members)
    monkeypatch.setitem(registry.MIRRORS, DatasetName.CIFAR10, ("http://up/",))
    _serve(monkeypatch, {archive.name: archive.read_bytes()})  # md5 is not the canonical one
    root = tmp_path / "root"
    message = r"could not download cifar-10-binary.tar.gz: http://up/.*md5 .*expected c32a1d4a"
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", "test", root, download=True)
    assert list(root.rglob("*")) == [root / "cifar10"]  # the folder, empty: no partial or temporary file


def test_interrupted_download_leaves_no_file_behind(datafiles, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, bless) -> None:
    files, _ = _mnist_files(datafiles, tmp_path)
    bless(DatasetName.MNIST, *(tmp_path / "source").iterdir())
    monkeypatch.setitem(registry.MIRRORS, DatasetName.MNIST, ("http://up/",))
    _serve(monkeypatch, files, fail_after=64)
    with pytest.raises(DataError, match="connection reset"):
        load_dataset("mnist", "test", tmp_path / "root", download=True)
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []
