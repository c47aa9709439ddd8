"""Checksums: is a file the canonical one? Verdicts are cached per (path, size, mtime) in-process."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from phalanx.data.errors import DataError, NoncanonicalDataWarning
from phalanx.data.registry import KNOWN_COPIES, UNKNOWN_COPY

_CHUNK = 1 << 20
_DIGESTS: dict[tuple[str, str, int, int], str] = {}


def md5_file(path: Path) -> str:
    """md5 hex digest of a file, remembered while the file's size and mtime are unchanged."""
    return _digest_file(path, "md5")


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, remembered while the file's size and mtime are unchanged."""
    return _digest_file(path, "sha256")


def _digest_file(path: Path, algorithm: str) -> str:
    stat = path.stat()
    key = (algorithm, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _DIGESTS.get(key)
    if cached is None:
        digest = hashlib.new(algorithm, usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        cached = _DIGESTS[key] = digest.hexdigest()
    return cached


def check_canonical(files: list[tuple[Path, str | None]], dataset: str, allow_noncanonical: bool) -> str | None:
    """Refuse (DataError) or, when allowed, warn once about files whose md5 is not the canonical one;
    return which copy the files are: None for the canonical files, else the label that tables print
    beside the dataset's name (a known copy's, or UNKNOWN_COPY).

    `files` pairs each path with its canonical md5, or None where no canonical value is published
    (the extracted CIFAR-10 binary files): those load with a warning that they could not be verified.
    """
    problems, unverified, labels = [], [], set()
    for path, expected in files:
        if expected is None:
            unverified.append(str(path))
            continue
        found = md5_file(path)
        if found != expected:
            known = KNOWN_COPIES.get(found)
            labels.add(known.label if known else UNKNOWN_COPY)
            problems.append(f"{path} has md5 {found}, canonical {expected}: "
                            f"{known.description if known else 'not the canonical file'}")
    if problems:
        listing = "; ".join(problems)
        if not allow_noncanonical:
            raise DataError(f"{dataset}: {listing}. Use the canonical files "
                            "(e.g. download=True into an empty "
                            "root), or pass allow_noncanonical=True to load these anyway")
        warnings.warn(f"{dataset}: loading data that are not the canonical files: {listing}",
                      NoncanonicalDataWarning, stacklevel=4)
    if unverified:
        labels.add(UNKNOWN_COPY)
        warnings.warn(f"{dataset}: no canonical checksum is published for {', '.join(unverified)}; structure "
                      "checked but contents not verified (point root at the official archive to verify)",
                      NoncanonicalDataWarning, stacklevel=4)
    if not labels:
        return None
    return labels.pop() if len(labels) == 1 else UNKNOWN_COPY
