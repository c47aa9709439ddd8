"""`image-folder`: your own images in `root/train/<class>/` and `root/test/<class>/` (e.g. Tiny-ImageNet
after moving each class's images into one folder per class).

- Files: `.png`, `.jpg`, `.jpeg` (any case) directly in each class folder; other files, hidden
  names and deeper folders are ignored. Only Pillow's PNG and JPEG decoders are ever used.
- Classes: the sorted names of `train/`'s subfolders; `test/` (optional: without it there is no
  test split) must have the same ones. Each class folder holds at least one image; two classes at least.
- Images: all of one square size (an odd one is refused by name and size, never resized); RGB, or
  L (one channel) when every training image is grayscale; alpha is dropped.
- Cache: the decoded arrays go to `root/.phalanx-cache/{train,test}.npz` (plain arrays, read back
  with `allow_pickle=False`) and `cache.json` (sealed JSON, see `phalanx.files`): the SHA-256 of each
  `.npz`, a fingerprint of the source images (relative path, size and mtime of each), the classes,
  the mode, the size and the statistics. A folder that changed rebuilds the cache; a damaged cache
  is rebuilt with a DamagedFileWarning; a cache that cannot be written (read-only folder) is skipped
  with a DataCacheWarning. A lock on the folder keeps processes that start together (DDP ranks)
  from building it twice at once.
- Statistics (`dataset_info("image-folder", root).spec`): the per-channel mean and standard
  deviation of the training pixels in [0, 1], from exact integer sums.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phalanx.data.errors import DataCacheWarning, DataError
from phalanx.data.integrity import sha256_file
from phalanx.data.registry import SPLITS, DatasetInfo, DatasetName
from phalanx.files import (
    DamagedFileError, DamagedFileWarning, read_json, write_bytes_atomic, write_json_atomic,
)
from phalanx.models.base import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_DIR = ".phalanx-cache"
CACHE_FORMAT = "phalanx-image-folder-cache/1"
_SIDECAR = "cache.json"
_DECODERS = ["PNG", "JPEG"]
_GRAYSCALE_MODES = frozenset({"1", "L", "LA"})
_DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # 16-bit and floating-point pixels
_STATS_BLOCK = 1024  # images per block when summing pixels
# Metadata of folders whose cache could not be written, by folder and fingerprint (this process only).
_UNCACHED: dict[tuple[Path, str], dict] = {}


@dataclass(frozen=True)
class _Listing:
    """The image files of a folder dataset, as found on disk, and their fingerprint."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[tuple[Path, int], ...]]  # split -> ((path, label), ...), splits present only
    fingerprint: str


def folder_info(root: str | Path | None) -> DatasetInfo:
    """The DatasetInfo of the image folder at `root`, its spec computed from its training images (cached)."""
    listing = _scan(_require_root(root))
    with _lock(listing.root):
        meta = _valid_cache(listing) or _UNCACHED.get((listing.root, listing.fingerprint))
        if meta is None:
            _, meta = _build_and_store(listing)
    channels = 1 if meta["mode"] == "L" else 3
    spec = InputSpec(channels, meta["size"], len(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]))
    return DatasetInfo(DatasetName.IMAGE_FOLDER, f"{listing.root.name} (image folder)", spec,
                       tuple(meta["classes"]))


def load_folder(root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x C x H x W images and int64 labels of `split` of the image folder at `root`."""
    listing = _scan(_require_root(root))
    if split not in listing.files:
        raise DataError(f"{listing.root} has no {split}/ folder; image-folder's {split} split is "
                        f"{listing.root / split}/<class>/*.png|jpg|jpeg with the same classes as train/")
    with _lock(listing.root):
        meta = _valid_cache(listing)
        if meta is not None:
            arrays = _read_split(listing, meta, split)
            if arrays is not None:
                return arrays
        built, _ = _build_and_store(listing)
    return built[split]


# --- the folder ----------------------------------------------------------------------------------

def _require_root(root: str | Path | None) -> Path:
    if root is None:
        raise DataError("image-folder needs a root (data.root): the folder that holds train/<class>/ "
                        "(and test/<class>/) with .png/.jpg/.jpeg images")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image-folder root {base} is not a folder; expected one that holds train/<class>/ "
                        "(and test/<class>/) with .png/.jpg/.jpeg images")
    if not (base / "train").is_dir():
        raise DataError(f"{base} has no train/ folder; image-folder expects "
                        f"{base}/train/<class>/*.png|jpg|jpeg (and {base}/test/<class>/... "
                        "for the test split)")
    return base.resolve()


def _scan(root: Path) -> _Listing:
    """Classes and image files of each split present, checked for layout; nothing is decoded."""
    classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has {len(classes)} class folder(s) "
                        f"({', '.join(classes) or 'none'}); image-folder needs at least 2: "
                        "one subfolder of images per class")
    files = {"train": _class_files(root / "train", classes)}
    if (root / "test").is_dir():
        found = sorted(e.name for e in os.scandir(root / "test") if e.is_dir() and not e.name.startswith("."))
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            parts = ([f"lacks {_some(missing)}"] if missing else []) + ([f"has {_some(extra)} not in train/"]
                                                                       if extra else [])
            raise DataError(f"{root / 'test'} {' and '.join(parts)}; test/ must hold the same class folders "
                            f"as train/ ({len(classes)})")
        files["test"] = _class_files(root / "test", classes)
    entries = [[split, path.relative_to(root).as_posix(), *_size_mtime(path)]
               for split in SPLITS if split in files for path, _ in files[split]]
    canonical = json.dumps([CACHE_FORMAT, entries], separators=(",", ":"))
    return _Listing(root, tuple(classes), files, hashlib.sha256(canonical.encode("utf-8")).hexdigest())


def _class_files(split_dir: Path, classes: list[str]) -> tuple[tuple[Path, int], ...]:
    out = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        entries = list(os.scandir(folder))
        images = sorted(e.name for e in entries if e.is_file() and not e.name.startswith(".")
                        and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
        if not images:
            subfolders = sorted(e.name + "/" for e in entries if e.is_dir())
            hint = (f"; images must sit directly in it, not in subfolders ({_some(subfolders)})"
                    if subfolders else "")
            raise DataError(f"{folder} holds no .png/.jpg/.jpeg image{hint}")
        out += [(folder / image, label) for image in images]
    return tuple(out)


def _size_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- decoding ----------------------------------------------------------------------------------------

def _build(listing: _Listing) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Decode every image (all checks first, on the headers), and the cache's metadata."""
    headers = {split: [(path, *_header(path)) for path, _ in files] for split, files in listing.files.items()}
    first_path, size, _ = headers["train"][0]
    if size[0] != size[1]:
        raise DataError(f"{first_path}: {size[0]}x{size[1]} pixels; image-folder needs square images "
                        "(models take size x size inputs); crop or pad them first")
    for split in listing.files:
        for path, found, mode in headers[split]:
            if found != size:
                raise DataError(f"{path}: {found[0]}x{found[1]} pixels, but {first_path} (the first training "
                                f"image) is {size[0]}x{size[1]}; every image must have the same size "
                                "(image-folder never resizes)")
            if mode in _DEEP_MODES:
                raise DataError(f"{path}: pixel mode {mode!r} (16-bit or floating-point); image-folder reads "
                                "8-bit images (grayscale, RGB, palette): save it as 8-bit")
    grayscale = all(mode in _GRAYSCALE_MODES for _, _, mode in headers["train"])
    target = "L" if grayscale else "RGB"
    if grayscale:
        for path, _, mode in headers.get("test", []):
            if mode not in _GRAYSCALE_MODES:
                raise DataError(f"{path}: a colour image (mode {mode!r}), but every training image is "
                                "grayscale; the test images must be grayscale too (or the training set "
                                "in colour)")
    arrays = {split: _decode_all(files, target, size[0]) for split, files in listing.files.items()}
    mean, std = _statistics(arrays["train"][0], listing.root / "train")
    meta = {"format": CACHE_FORMAT, "fingerprint": listing.fingerprint, "classes": list(listing.classes),
            "mode": target, "size": size[0], "mean": mean, "std": std,
            "splits": {split: {"count": len(labels)} for split, (_, labels) in arrays.items()}}
    return arrays, meta


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode of an image, from its header."""
    from PIL import Image

    try:
        with Image.open(path, formats=_DECODERS) as image:
            return image.size, image.mode
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def _decode_all(files: tuple[tuple[Path, int], ...], mode: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    channels = 1 if mode == "L" else 3
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path, formats=_DECODERS) as image:
                image.load()  # decodes now: a truncated or corrupted file fails here
                pixels = np.asarray(image if image.mode == mode else image.convert(mode), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise _unreadable(path, exc) from None
        images[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    return images, np.array([label for _, label in files], dtype=np.int64)


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: not a readable PNG or JPEG image ({type(exc).__name__}: {exc}); "
                     "replace or remove it (image-folder decodes .png/.jpg/.jpeg files with Pillow)")


def _statistics(images: np.ndarray, where: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of uint8 images, in [0, 1] units."""
    n, channels, h, w = images.shape
    total, squares = [0] * channels, [0] * channels
    for start in range(0, n, _STATS_BLOCK):
        block = images[start:start + _STATS_BLOCK].astype(np.int64)
        total = [t + int(v) for t, v in zip(total, block.sum(axis=(0, 2, 3)))]
        squares = [s + int(v) for s, v in zip(squares, (block * block).sum(axis=(0, 2, 3)))]
    count = n * h * w
    mean = [t / count / 255 for t in total]
    std = [math.sqrt(s * count - t * t) / count / 255 for s, t in zip(squares, total)]  # exact until the sqrt
    flat = [c for c, s in enumerate(std) if s == 0]
    if flat:
        raise DataError(f"{where}: every training pixel has the same value in channel(s) {flat}; "
                        "the images cannot be standardised (a folder of blank images?)")
    return mean, std


# --- the cache -----------------------------------------------------------------------------------

@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder itself while its cache is checked, read or built.

    Locking the directory (flock on its descriptor) creates no file, so a refused folder is left as it was.
    """
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _valid_cache(listing: _Listing) -> dict | None:
    """The cache's metadata when it was built from these very files; None to rebuild (warned when damaged)."""
    sidecar = listing.root / CACHE_DIR / _SIDECAR
    if not sidecar.is_file():
        return None
    try:
        meta = read_json(sidecar)
    except DamagedFileError as exc:
        return _damaged(str(exc))
    except OSError as exc:
        return _damaged(f"{sidecar} could not be read ({exc})")
    if not _well_formed(meta):
        return _damaged(f"{sidecar} is damaged: not an image-folder cache record of format {CACHE_FORMAT}")
    if meta["fingerprint"] != listing.fingerprint or set(meta["splits"]) != set(listing.files):
        return None  # the folder changed since: rebuilt without a warning
    return meta


def _well_formed(meta: object) -> bool:
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return False
    channels = {"L": 1, "RGB": 3}.get(meta.get("mode"))  # type: ignore[arg-type]
    splits = meta.get("splits")
    return (channels is not None and isinstance(meta.get("fingerprint"), str)
            and isinstance(meta.get("size"), int) and meta["size"] > 0
            and isinstance(meta.get("classes"), list) and all(isinstance(c, str) for c in meta["classes"])
            and all(isinstance(meta.get(k), list) and len(meta[k]) == channels
                    and all(isinstance(v, float) and v >= 0 for v in meta[k]) for k in ("mean", "std"))
            and isinstance(splits, dict) and set(splits) <= set(SPLITS)
            and all(isinstance(e, dict) and isinstance(e.get("count"), int)
                    and isinstance(e.get("sha256"), str) for e in splits.values()))


def _read_split(listing: _Listing, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays of `split` after checking the file's SHA-256; None (warned) when damaged."""
    path = listing.root / CACHE_DIR / f"{split}.npz"
    entry = meta["splits"][split]
    if not path.is_file():
        return _damaged(f"{path} is missing though {_SIDECAR} lists it")
    if sha256_file(path) != entry["sha256"]:
        return _damaged(f"{path} is damaged: its SHA-256 does not match {_SIDECAR}")
    channels, size = (1 if meta["mode"] == "L" else 3), meta["size"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        return _damaged(f"{path} is not a readable array file ({type(exc).__name__}: {exc})")
    if (images.dtype != np.uint8 or images.shape != (entry["count"], channels, size, size)
            or labels.dtype != np.int64 or labels.shape != (entry["count"],)):
        return _damaged(f"{path} holds images {images.dtype} {images.shape} and labels {labels.dtype} "
                        f"{labels.shape}, not what {_SIDECAR} records")
    return images, labels


def _damaged(message: str) -> None:
    warnings.warn(f"image-folder cache: {message}; decoding the images again to rebuild it",
                  DamagedFileWarning, stacklevel=4)
    return None


def _build_and_store(listing: _Listing) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Decode the folder and write its cache: the arrays first, the sidecar that vouches for them last."""
    arrays, meta = _build(listing)
    cache = listing.root / CACHE_DIR
    try:
        (cache / _SIDECAR).unlink(missing_ok=True)  # a build cut short leaves no sidecar: it is simply redone
        for split, (images, labels) in arrays.items():
            buffer = io.BytesIO()
            np.savez(buffer, images=images, labels=labels)
            write_bytes_atomic(cache / f"{split}.npz", buffer.getbuffer())
            meta["splits"][split]["sha256"] = hashlib.sha256(buffer.getbuffer()).hexdigest()
        write_json_atomic(cache / _SIDECAR, meta)
    except OSError as exc:
        warnings.warn(f"image-folder cache: could not write {cache} ({exc}); the images were decoded and "
                      "will be decoded again next time", DataCacheWarning, stacklevel=4)
        _UNCACHED[(listing.root, listing.fingerprint)] = meta  # asking for the spec again decodes nothing
    return arrays, meta
