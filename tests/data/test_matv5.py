"""SVHN (cropped digits) on small generated MATLAB v5 files, our reader checked against scipy's, refusals."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from phalanx.data import DataError, DatasetName, NoncanonicalDataWarning, dataset_info, load_dataset, registry
from phalanx.data import download as download_module
from phalanx.data.matv5 import read_mat_v5

pytestmark = pytest.mark.usefixtures("small_sizes")


def _scipy_mat(x: np.ndarray, y: np.ndarray, compress: bool) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x, "y": y}, do_compression=compress)
    return buffer.getvalue()


def _expected(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As torchvision reads SVHN: images X.transpose(3, 2, 0, 1), the label 10 as the digit 0."""
    return np.transpose(x, (3, 2, 0, 1)), (y[:, 0].astype(np.int64) % 10)


def test_info_is_colour_digits() -> None:
    info = dataset_info("svhn")
    assert (info.spec.channels, info.spec.size, info.spec.num_classes) == (3, 32, 10)
    assert info.class_names == tuple("0123456789")


@pytest.mark.parametrize("writer", ["matlab-compressed", "matlab-big-endian", "scipy", "scipy-compressed"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_loads_the_official_layout_from_a_folder_or_its_parent(datafiles, tmp_path: Path, bless,
                                                               writer: str, split: str) -> None:
    n = datafiles.SVHN_SIZES[split]
    x, y = datafiles.svhn_arrays(n, seed=3)
    raw = {"matlab-compressed": lambda: datafiles.svhn_mat(x, y),
           "matlab-big-endian": lambda: datafiles.svhn_mat(x, y, order=">"),
           "scipy": lambda: _scipy_mat(x, y, False),
           "scipy-compressed": lambda: _scipy_mat(x, y, True)}[writer]()
    path = tmp_path / "svhn" / registry.SVHN_FILES[split]
    path.parent.mkdir()
    path.write_bytes(raw)
    bless(DatasetName.SVHN, path)
    images, labels = _expected(x, y)
    for root in (tmp_path, tmp_path / "svhn"):
        xt, yt = load_dataset("svhn", split, root)
        assert xt.dtype == torch.uint8 and yt.dtype == torch.int64 and xt.shape == (n, 3, 32, 32)
        assert np.array_equal(xt.numpy(), images) and np.array_equal(yt.numpy(), labels)
    assert 0 in yt.tolist() and 10 not in yt.tolist()  # y = 10 is the digit 0
    # pixel (row 0, column 1) of image 0, red channel: X[0, 1, 0, 0] in MATLAB's (row, column, channel, image)
    assert xt[0, 0, 0, 1] == x[0, 1, 0, 0] and xt[0, 0, 1, 0] == x[1, 0, 0, 0]


def test_reader_agrees_with_scipy_on_numeric_matrices() -> None:
    rng = np.random.default_rng(0)
    variables = {"a": rng.normal(size=(3, 4)), "bb": rng.integers(0, 255, (2, 3, 4), dtype=np.uint8),
                 "c_long_name": rng.integers(-5, 5, (5, 1)).astype(np.int32), "e": np.zeros((0, 3))}
    for compress in (False, True):
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, variables, do_compression=compress)
        out = read_mat_v5(buffer.getvalue(), "t", tuple(variables), max_bytes=1 << 16)
        for name, value in variables.items():
            assert out[name].dtype == value.dtype and np.array_equal(out[name], value), (name, compress)
    out = read_mat_v5(buffer.getvalue(), "t", ("a",), max_bytes=1 << 16)
    assert out["a"] is not None and out["bb"] is None  # variables not asked for are skipped unread


def test_md5_mismatch_is_refused_unless_allowed(datafiles, tmp_path: Path) -> None:
    x, y = datafiles.svhn_arrays(3)
    (tmp_path / "test_32x32.mat").write_bytes(datafiles.svhn_mat(x, y))
    message = r"test_32x32.mat has md5 .*canonical eb5a983b.*allow_noncanonical=True"
    with pytest.raises(DataError, match=message):
        load_dataset("svhn", "test", tmp_path)
    with pytest.warns(NoncanonicalDataWarning, match="not the canonical files"):
        xt, _ = load_dataset("svhn", "test", tmp_path, allow_noncanonical=True)
    assert np.array_equal(xt.numpy(), _expected(x, y)[0])


def _damaged(datafiles, which: str) -> bytes:
    x, y = datafiles.svhn_arrays(3)
    good = datafiles.svhn_mat(x, y)
    if which == "truncated":
        return good[:-20]
    if which == "cut-stream":  # a compressed element whose own length is consistent but whose stream stops
        packed = zlib.compress(datafiles.mat_matrix("X", x))[:-50]
        return good[:128] + np.array([15, len(packed)], "<u4").tobytes() + packed
    if which == "truncated-uncompressed":
        return datafiles.svhn_mat(x, y, compress=False)[:2000]
    if which == "wrong-count":
        return datafiles.svhn_mat(*datafiles.svhn_arrays(4))
    if which == "label-11":
        return datafiles.svhn_mat(x, np.array([[1.0], [11.0], [2.0]]))
    if which == "label-0":
        return datafiles.svhn_mat(x, np.array([[0.0], [1.0], [2.0]]))
    if which == "label-fraction":
        y = np.array([[1.0], [2.5], [2.0]])  # stored as doubles: a fraction survives
        elements = [datafiles.mat_matrix("X", x), datafiles.mat_matrix("y", y)]
        return datafiles.mat_file(elements, compress=False)
    if which == "no-y":
        return datafiles.mat_file([datafiles.mat_matrix("X", x)])
    if which == "y-shape":
        return datafiles.svhn_mat(x, y.T)
    if which == "x-double":
        return datafiles.mat_file([datafiles.mat_matrix("X", x.astype(np.float64)),
                                   datafiles.mat_matrix("y", y)])
    if which == "x-cell":
        return datafiles.mat_file([datafiles.mat_matrix("X", x, mx_class=1), datafiles.mat_matrix("y", y)])
    if which == "v7.3":
        return datafiles.svhn_mat(x, y, version=0x0200)
    if which == "not-mat":
        return b"\x89HDF\r\n\x1a\n" + good[8:]
    if which == "bad-zlib":
        return good[:136] + bytes(b ^ 0xFF for b in good[136:160]) + good[160:]
    if which == "zip-bomb":
        element = datafiles.mat_matrix("X", np.zeros((32, 32, 3, 400), np.uint8))
        return datafiles.mat_file([element, datafiles.mat_matrix("y", y)])
    raise AssertionError(which)


@pytest.mark.parametrize("which, message", [
    ("truncated", r"an element of (\d+) bytes at byte \d+, \d+ are left; the file is truncated or corrupted"),
    ("cut-stream", r"compressed element at byte 128: the compressed data end early; the file is truncated"),
    ("truncated-uncompressed", r"an element of \d+ bytes at byte \d+, \d+ are left; the file is truncated"),
    ("wrong-count", r"X is uint8 of shape \(32, 32, 3, 4\), expected uint8 of shape \(32, 32, 3, 3\)"),
    ("label-11", r"label 11 at index 1 \(1 bad in all\); SVHN labels must be 1\.\.10 "
                 r"\(10 stands for the digit 0\)"),
    ("label-0", r"label 0 at index 0 .*SVHN labels must be 1\.\.10"),
    ("label-fraction", r"label 2\.5 at index 1 .*SVHN labels must be 1\.\.10"),
    ("no-y", r"no variable 'y' \(found: 'X'\); an SVHN cropped-digits file holds X \(32 x 32 x 3 x 3 uint8"),
    ("y-shape", r"y has shape \(1, 3\), expected \(3, 1\)"),
    ("x-double", r"X is float64 of shape \(32, 32, 3, 3\), expected uint8"),
    ("x-cell", r"variable 'X' is a cell array, expected a numeric matrix"),
    ("v7.3", r"MAT file version 0x0200 \(a v7.3 file, which is HDF5\); only MAT v5"),
    ("not-mat", r"not a MATLAB .mat file"),
    ("bad-zlib", r"compressed element at byte 128: not a valid zlib stream"),
    ("zip-bomb", r"decompresses to more than \d+ bytes"),
])
def test_damaged_files_are_refused_naming_the_file(datafiles, tmp_path: Path, bless, which: str,
                                                   message: str) -> None:
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(_damaged(datafiles, which))
    bless(DatasetName.SVHN, path)
    with pytest.raises(DataError, match=rf"test_32x32.mat.*{message}"):
        load_dataset("svhn", "test", tmp_path)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"svhn train: found none of train_32x32.mat in .*download=True"):
        load_dataset("svhn", "train", tmp_path)


def test_download_fetches_only_the_split_asked_for(datafiles, tmp_path: Path, bless,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = datafiles.svhn_arrays(3)
    source = tmp_path / "source" / "test_32x32.mat"
    source.parent.mkdir()
    source.write_bytes(datafiles.svhn_mat(x, y))
    bless(DatasetName.SVHN, source)
    requested = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(source.stat().st_size)}

    def urlopen(url: str, timeout: float) -> Response:
        requested.append(url)
        return Response(source.read_bytes())

    monkeypatch.setattr(download_module.urllib.request, "urlopen", urlopen)
    xt, _ = load_dataset("svhn", "test", tmp_path / "root", download=True)
    assert requested == ["http://ufldl.stanford.edu/housenumbers/test_32x32.mat"]
    assert np.array_equal(xt.numpy(), _expected(x, y)[0])
    assert [p.name for p in (tmp_path / "root" / "svhn").iterdir()] == ["test_32x32.mat"]


def test_a_compressed_stream_is_inflated_no_further_than_the_limit() -> None:
    element = b"\0" * (1 << 20)
    raw = b"MATLAB 5.0".ljust(124, b" ") + (0x0100).to_bytes(2, "little") + b"IM"
    packed = zlib.compress(element)
    raw += np.array([15, len(packed)], "<u4").tobytes() + packed
    with pytest.raises(DataError, match=r"decompresses to more than 1000 bytes"):
        read_mat_v5(raw, "t", ("X",), max_bytes=1000)
