"""Parsers for the official file formats, with the structural checks that always run.

Every parser takes the raw bytes and the file's name (for messages) and returns numpy arrays,
or raises DataError naming the file, what was wrong and what was expected.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from phalanx.data.errors import DataError
from phalanx.data.matv5 import read_mat_v5

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
CIFAR_PIXELS = 3 * 32 * 32


def gunzip(data: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: not a valid gzip file ({exc}); delete it and download it again") from None


def _idx_header(raw: bytes, source: str, magic: int, ndim: int) -> tuple[int, ...]:
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: {len(raw)} bytes is too short for an idx header ({header} bytes); "
                        "the file is truncated or not an idx file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{source}: idx magic number 0x{found:08x}, expected 0x{magic:08x}; "
                        "this is not an idx file of the expected kind")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = len(raw) - header
    if payload != int(np.prod(dims)):
        raise DataError(f"{source}: header says {'x'.join(map(str, dims))} = {int(np.prod(dims))} bytes "
                        f"of data, found {payload}; the file is truncated or corrupted")
    return dims


def parse_idx_images(raw: bytes, source: str, count: int, size: int) -> np.ndarray:
    """uint8 N x 1 x size x size from an uncompressed idx3 file, checking magic, dims and length."""
    dims = _idx_header(raw, source, IDX_IMAGES_MAGIC, 3)
    if dims != (count, size, size):
        raise DataError(f"{source}: images of shape {dims}, expected {(count, size, size)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, 1, size, size)


def parse_idx_labels(raw: bytes, source: str, count: int) -> np.ndarray:
    """int64 labels from an uncompressed idx1 file, checking magic, count, length and range."""
    dims = _idx_header(raw, source, IDX_LABELS_MAGIC, 1)
    if dims != (count,):
        raise DataError(f"{source}: {dims[0]} labels, expected {count}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    check_labels(labels, source)
    return labels


def check_labels(labels: np.ndarray, source: str, num_classes: int = 10) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{source}: label {int(labels[i])} at index {i} ({bad.size} bad in all); "
                        f"labels must be in 0..{num_classes - 1}")


def parse_cifar_binary(raw: bytes, source: str, records: int, *, label_bytes: int = 1,
                       num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary batch: `records` rows of `label_bytes` label bytes + 3072 pixel bytes (R, G, B
    planes).

    CIFAR-10 has one label byte; CIFAR-100 two (coarse, fine): the class is the last one.
    """
    record = label_bytes + CIFAR_PIXELS
    if len(raw) != records * record:
        raise DataError(f"{source}: {len(raw)} bytes, expected {records} records of {record} bytes "
                        f"= {records * record}; the file is truncated or not a CIFAR binary batch "
                        "of this dataset")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(records, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    check_labels(labels, source, num_classes)
    return rows[:, label_bytes:].reshape(records, 3, 32, 32), labels


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"pickle asks for _codecs.encode with {type(text).__name__}, {encoding!r}; "
                        "only latin1 text is allowed")
    return text.encode("latin1")


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = _latin1_encode
    if hasattr(numeric, "_frombuffer"):
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused before it is loaded.

    The CIFAR python versions are pickles; a plain `pickle.load` would run whatever a tampered
    file asks for. Only the callables needed to rebuild an ndarray are resolved here.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self.allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise DataError(f"{self.source}: the pickle asks for {module}.{name}, which is not allowed "
                            "(only numpy arrays and plain containers are); the file is not a CIFAR batch "
                            "and was not loaded")
        return found


def restricted_loads(raw: bytes, source: str) -> object:
    try:
        return RestrictedUnpickler(io.BytesIO(raw), source).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupted pickle raises many kinds of errors
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def parse_cifar_python(raw: bytes, source: str, records: int, *, label_key: str = "labels",
                       num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: a dict with `data` (records x 3072 uint8) and `label_key` (records ints)."""
    obj = restricted_loads(raw, source)
    if not isinstance(obj, dict):
        raise DataError(f"{source}: the pickle holds a {type(obj).__name__}, "
                        f"expected a dict with 'data' and {label_key!r}")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = entries.get("data"), entries.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (records, CIFAR_PIXELS):
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' is {type(data).__name__} {getattr(data, 'dtype', '')} "
                        f"of shape {shape}, "
                        f"expected a uint8 array of shape ({records}, {CIFAR_PIXELS})")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != records:
        raise DataError(f"{source}: {label_key!r} is {type(labels).__name__} of length "
                        f"{len(labels) if hasattr(labels, '__len__') else '?'}, expected {records} labels")
    labels = np.asarray(labels, dtype=np.int64)
    check_labels(labels, source, num_classes)
    return data.reshape(records, 3, 32, 32), labels


def parse_svhn(raw: bytes, source: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat file: `X` (32 x 32 x 3 x count uint8) and `y` (count x 1, 1..10).

    The label 10 stands for the digit 0 (SVHN's convention) and becomes 0, so labels are the digits.
    """
    # the largest variable, X, is 3072 bytes per image; a little room for y and the headers
    arrays = read_mat_v5(raw, source, ("X", "y"), max_bytes=CIFAR_PIXELS * count + (1 << 20))
    missing = [name for name in ("X", "y") if name not in arrays]
    if missing:
        raise DataError(f"{source}: no variable {' or '.join(map(repr, missing))} (found: "
                        f"{', '.join(map(repr, arrays)) or 'none'}); an SVHN cropped-digits file holds "
                        f"X (32 x 32 x 3 x {count} uint8 images) and y ({count} x 1 labels)")
    x, y = arrays["X"], arrays["y"]
    if x.dtype != np.uint8 or x.shape != (32, 32, 3, count):
        raise DataError(f"{source}: X is {x.dtype} of shape {x.shape}, "
                        f"expected uint8 of shape (32, 32, 3, {count})")
    if y.shape != (count, 1):
        raise DataError(f"{source}: y has shape {y.shape}, expected ({count}, 1)")
    values = y[:, 0]
    bad = np.flatnonzero((values != np.round(values)) | (values < 1) | (values > 10))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{source}: label {values[i]:g} at index {i} ({bad.size} bad in all); "
                        "SVHN labels must be 1..10 (10 stands for the digit 0)")
    labels = values.astype(np.int64) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def read_tar_members(archive: Path, wanted: list[str]) -> dict[str, bytes]:
    """The bytes of the members named exactly `wanted`, read in one pass without extracting anything.

    Refuses archives with absolute or `..` member names (met before the wanted ones are all read),
    and wanted members that are not regular files (links, devices); nothing is written to disk.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise DataError(f"{archive}: member {member.name!r} points outside the archive; "
                                    "refusing to read it (only the expected dataset files are allowed)")
                if member.name not in wanted:
                    continue
                if not member.isfile():
                    raise DataError(f"{archive}: member {member.name!r} is a link or special file, "
                                    "expected a regular file")
                handle = tar.extractfile(member)
                assert handle is not None  # regular file
                found[member.name] = handle.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc}); "
                        "the file is truncated or corrupted: delete it and download it again") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{archive}: missing member(s) {', '.join(missing)}; "
                        "not a complete archive of this dataset")
    return found


def tar_top_folder(archive: Path) -> str | None:
    """The top folder of the first member of an archive (tells the binary version from the python one)."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                return PurePosixPath(member.name).parts[0]
            return None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc})") from None
