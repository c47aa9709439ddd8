"""`load_dataset`: a split of a dataset as uint8 N x C x H x W images and int64 labels.

Where files are looked for (`root`, or `$PHALANX_DATA`, or `~/.cache/phalanx/data` when None):
1. `root` itself, when it holds the files (e.g. the four MNIST idx `.gz` files; CIFAR-10's
   `cifar-10-batches-bin/`, `cifar-10-binary.tar.gz`, `cifar-10-batches-py/`, `cifar-10-python.tar.gz`,
   or the batch files themselves; CIFAR-100's `cifar-100-binary/`, `cifar-100-python/` or their
   `.tar.gz`; SVHN's `train_32x32.mat` / `test_32x32.mat`);
2. else its subfolder named after the dataset (`mnist/`, `fashion-mnist/`, `cifar10/`, `cifar100/`,
   `svhn/`), then any subfolder `<name>-*` in sorted order (so `../shared/data` finds
   `cifar10-jpeg-decoded/`);
3. `root` may also be a CIFAR archive (`.tar.gz`) itself.
With `download=True` missing files are fetched into `<root>/<name>/`. Archives are read in place,
by exact member names; nothing is extracted to disk.

`digits` needs no root: it is embedded in the package (see `phalanx.data.digits`). `image-folder`
needs one: the folder that holds `train/<class>/` (see `phalanx.data.imagefolder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phalanx.data import formats, registry
from phalanx.data.digits import load_digits
from phalanx.data.download import download_file
from phalanx.data.errors import DataError
from phalanx.data.imagefolder import load_folder
from phalanx.data.integrity import check_canonical
from phalanx.data.registry import CIFAR_LAYOUTS, DatasetName, coerce_name, coerce_split


def default_root() -> Path:
    """`$PHALANX_DATA`, else `~/.cache/phalanx/data`."""
    return Path(os.environ.get("PHALANX_DATA") or "~/.cache/phalanx/data").expanduser()


@dataclass(frozen=True)
class LoadedSplit:
    """A split as loaded: uint8 N x C x H x W images, int64 labels, and which copy of the dataset
    they came from (`copy`: None for the canonical files or a dataset without a canonical copy,
    else the label tables print beside the name, e.g. "JPEG-decoded copy")."""

    images: torch.Tensor
    labels: torch.Tensor
    copy: str | None = None


def load_dataset(name: str | DatasetName, split: str, root: str | Path | None = None, *,
                 download: bool = False, allow_noncanonical: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, N x C x H x W) and labels (int64, N) of `split` ("train" or "test") of `name`
    (`load_split` without the provenance)."""
    loaded = load_split(name, split, root, download=download, allow_noncanonical=allow_noncanonical)
    return loaded.images, loaded.labels


def load_split(name: str | DatasetName, split: str, root: str | Path | None = None, *,
               download: bool = False, allow_noncanonical: bool = False) -> LoadedSplit:
    """`split` ("train" or "test") of `name`, with the copy it came from.

    Files are checked against the canonical md5 (refused unless `allow_noncanonical`, which loads
    them with a NoncanonicalDataWarning) and always structurally (sizes, counts, label range).
    An `image-folder` has no canonical copy: its images are decoded once and kept in a verified cache.
    """
    name, split = coerce_name(name), coerce_split(split)
    if name is DatasetName.DIGITS:
        images, labels = load_digits(split)
        return LoadedSplit(torch.from_numpy(images), torch.from_numpy(labels))
    if name is DatasetName.IMAGE_FOLDER:
        if download:
            raise DataError("image-folder cannot be downloaded (it is a folder of your own images); leave "
                            "download (data.download) false and point root (data.root) at the folder that "
                            "holds train/<class>/")
        images, labels = load_folder(root, split)
        return LoadedSplit(torch.from_numpy(images), torch.from_numpy(labels))
    base = Path(root).expanduser() if root is not None else default_root()
    source = _find(name, split, base)
    if source is None and download:
        _download(name, split, base)
        source = _find(name, split, base)
    if source is None:
        raise DataError(_not_found_message(name, split, base, download))
    images, labels, copy = _load(name, split, source, allow_noncanonical)
    return LoadedSplit(torch.from_numpy(images), torch.from_numpy(labels), copy)


def _candidate_dirs(base: Path, name: DatasetName) -> list[Path]:
    dirs = [base, base / name.value]
    if base.is_dir():
        dirs += sorted(p for p in base.glob(f"{name.value}-*") if p.is_dir())
    return [d for d in dirs if d.is_dir()]


def _cifar_files(layout: registry.CifarLayout, split: str, suffix: str) -> list[str]:
    return [b + suffix for b in layout.batches[split]]


def _find(name: DatasetName, split: str, base: Path) -> tuple[str, Path] | None:
    """(layout, path) of the first place under `base` that holds `split`, or None."""
    cifar = CIFAR_LAYOUTS.get(name)
    if base.is_file():
        return ("archive", base) if cifar is not None else None
    for d in _candidate_dirs(base, name):
        if name is DatasetName.SVHN:
            if (d / registry.SVHN_FILES[split]).is_file():
                return "mat", d / registry.SVHN_FILES[split]
            continue
        if cifar is None:
            if all((d / f).is_file() for f in registry.IDX_FILES[split]):
                return "idx", d
            continue
        for layout, folder, suffix, archive in (("bin-dir", cifar.bin_dir, ".bin", cifar.bin_archive),
                                                ("py-dir", cifar.py_dir, "", cifar.py_archive)):
            for sub in (d, d / folder):
                if all((sub / f).is_file() for f in _cifar_files(cifar, split, suffix)):
                    return layout, sub
            if (d / archive).is_file():
                return "archive", d / archive
    return None


def _load(name: DatasetName, split: str, source: tuple[str, Path],
          allow_noncanonical: bool) -> tuple[np.ndarray, np.ndarray, str | None]:
    layout, path = source
    count = registry.SPLIT_SIZES[(name, split)]
    md5 = registry.MD5[name]
    if layout == "idx":
        image_file, label_file = (path / f for f in registry.IDX_FILES[split])
        copy = check_canonical([(image_file, md5[image_file.name]), (label_file, md5[label_file.name])],
                               name.value, allow_noncanonical)
        size = registry.dataset_info(name).spec.size
        images = formats.parse_idx_images(formats.gunzip(image_file.read_bytes(), str(image_file)),
                                          str(image_file), count, size)
        labels = formats.parse_idx_labels(formats.gunzip(label_file.read_bytes(), str(label_file)),
                                          str(label_file), count)
        return images.copy(), labels, copy
    if layout == "mat":
        copy = check_canonical([(path, md5[path.name])], name.value, allow_noncanonical)
        return (*formats.parse_svhn(path.read_bytes(), str(path), count), copy)
    cifar = CIFAR_LAYOUTS[name]
    if layout in ("bin-dir", "py-dir"):
        suffix = ".bin" if layout == "bin-dir" else ""
        files = [path / f for f in _cifar_files(cifar, split, suffix)]
        copy = check_canonical([(f, md5.get(f.name) if layout == "py-dir" else None) for f in files],
                               name.value, allow_noncanonical)
        blobs = {str(f): f.read_bytes() for f in files}
        return (*_parse_cifar(name, blobs, layout == "py-dir", count), copy)
    folder = formats.tar_top_folder(path)
    if folder not in (cifar.bin_dir, cifar.py_dir):
        raise DataError(f"{path}: archive's top folder is {folder!r}; expected {cifar.bin_dir!r} "
                        f"(binary version) or {cifar.py_dir!r} (python version) of "
                        f"{registry.dataset_info(name).display_name}")
    python = folder == cifar.py_dir
    copy = check_canonical([(path, md5[cifar.py_archive if python else cifar.bin_archive])], name.value,
                           allow_noncanonical)
    members = [f"{folder}/{f}" for f in _cifar_files(cifar, split, "" if python else ".bin")]
    found = formats.read_tar_members(path, members)
    blobs = {f"{path}:{m}": found[m] for m in members}
    return (*_parse_cifar(name, blobs, python, count), copy)


def _parse_cifar(name: DatasetName, blobs: dict[str, bytes], python: bool, count: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    if count % len(blobs):
        raise DataError(f"expected {count} examples in {len(blobs)} {name.value} batches; "
                        "not a whole number per batch")
    records = count // len(blobs)
    cifar, classes = CIFAR_LAYOUTS[name], registry.dataset_info(name).spec.num_classes
    if python:
        parts = [formats.parse_cifar_python(raw, source, records, label_key=cifar.label_key,
                                            num_classes=classes) for source, raw in blobs.items()]
    else:
        parts = [formats.parse_cifar_binary(raw, source, records, label_bytes=cifar.label_bytes,
                                            num_classes=classes) for source, raw in blobs.items()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _download(name: DatasetName, split: str, base: Path) -> None:
    if base.is_file():
        raise DataError(f"root {base} is a file; download=True needs a directory to download into")
    dest = base / name.value
    if name in CIFAR_LAYOUTS:
        wanted = [CIFAR_LAYOUTS[name].bin_archive]
    elif name is DatasetName.SVHN:
        wanted = [registry.SVHN_FILES[split]]  # one file per split, each large: only the one asked for
    else:
        wanted = [f for pair in registry.IDX_FILES.values() for f in pair]
    for file in wanted:
        if not (dest / file).is_file():
            download_file([m + file for m in registry.MIRRORS[name]], dest / file, registry.MD5[name][file])


def _not_found_message(name: DatasetName, split: str, base: Path, download: bool) -> str:
    cifar = CIFAR_LAYOUTS.get(name)
    if cifar is not None:
        batches = ", ".join(_cifar_files(cifar, split, "[.bin]"))
        expected = (f"{cifar.bin_dir}/ or {cifar.py_dir}/ (with {batches}), "
                    f"or {cifar.bin_archive} or {cifar.py_archive}")
    elif name is DatasetName.SVHN:
        expected = registry.SVHN_FILES[split]
    else:
        expected = ", ".join(registry.IDX_FILES[split])
    where = f"{base} or {base / name.value} or {base}/{name.value}-*"
    hint = "check the network or fetch the files by hand" if download else \
        "pass download=True, or point root (or $PHALANX_DATA) at a folder that holds them"
    return f"{name.value} {split}: found none of {expected} in {where}; {hint}"
