"""Atomic, checksummed file writes: a reader sees the old file or the complete new one, never a
partial one, and can tell a file that changed after phalanx wrote it.

A JSON document phalanx writes (a dict) carries `"sha256"`: the SHA-256 of the canonical dump
(sorted keys, no spaces) of the document without that field, as JSON reads it back; each line
that `append_jsonl` appends carries the same field for that line. Readers verify it
(`loads_checked`, `read_jsonl`); documents and lines written before checksums (no field) are read
unverified.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any


# The temporary name `write_bytes_atomic` gives (tempfile.mkstemp: 8 characters of [a-z0-9_]):
# only files named so are ever removed as leftovers.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_TEMP_GRACE_S = 2.0  # a temporary file younger than this may be one a writer has not locked yet
CHECKSUM_FIELD = "sha256"


class DamagedFileError(ValueError):
    """A file (or line) phalanx wrote whose content no longer matches its checksum."""


class DamagedFileWarning(UserWarning):
    """A damaged file or line was skipped, or a step that needs it was."""


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    The temporary file is locked (flock) while it is written, so `remove_temp_files` can tell a
    leftover of a killed writer from a write in progress. Leftovers of earlier writes of `path`
    itself are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(path.parent, target=path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run files are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # still locked: never seen unlocked under its temporary name
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise OSError(exc.errno, f"could not write {path} ({exc.strerror or exc}); {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_temp_files(directory: str | Path, *, target: str | None = None,
                      grace_s: float = _TEMP_GRACE_S) -> list[Path]:
    """Delete the temporary files that `write_bytes_atomic` leaves when its process is killed.

    Only files named as it names them (`.NAME.XXXXXXXX.tmp`; with `target`, only those of
    `target`) are candidates, and of those only the ones no live writer holds locked and older
    than `grace_s` (0 is safe where no other process writes, e.g. under the run's lock): a
    user's own `*.tmp` file and another process's write in progress are left alone.
    """
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or (target is not None and match["target"] != target) or not _abandoned(path, grace_s):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def is_temp_name(name: str, target: str) -> bool:
    """Whether `name` is one `write_bytes_atomic` gives its temporary files when writing `target`."""
    match = _TEMP_NAME.fullmatch(name)
    return match is not None and match["target"] == target


def _abandoned(path: Path, grace_s: float) -> bool:
    """Whether a temporary file's writer is gone: a regular file, not locked, not just created."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < grace_s:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write a JSON document atomically; a dict gets its checksum field (`seal`)."""
    write_text_atomic(path, json.dumps(seal(obj), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line, with its checksum field, and flush it to disk (metrics survive a crash)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(seal(obj)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def seal(obj: Any) -> Any:
    """A dict with its checksum field added (other JSON values are returned as they are)."""
    if not isinstance(obj, dict):
        return obj
    if CHECKSUM_FIELD in obj:
        raise ValueError(f"a document phalanx writes may not hold the key {CHECKSUM_FIELD!r}: it is the checksum's")
    return {**obj, CHECKSUM_FIELD: _digest(json.loads(json.dumps(obj)))}  # as a reader will see it


def loads_checked(text: str, source: str | Path) -> Any:
    """Parse a JSON document or line phalanx wrote and verify its checksum; the value without the field.

    Raises json.JSONDecodeError when it is not JSON, DamagedFileError (naming `source`) when its
    checksum does not match; a value without the field (written before checksums) is unverified.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict) or CHECKSUM_FIELD not in doc:
        return doc
    stored = doc.pop(CHECKSUM_FIELD)
    if stored != _digest(doc):
        raise DamagedFileError(f"{source} is damaged: its content does not match its {CHECKSUM_FIELD} "
                               "(changed after phalanx wrote it)")
    return doc


def read_json(path: str | Path) -> Any:
    """A JSON document phalanx wrote, verified; DamagedFileError naming `path` when it is damaged
    (not text, not JSON, or not matching its checksum)."""
    path = Path(path)
    try:
        return loads_checked(path.read_text(encoding="utf-8"), path)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(f"{path} is damaged: not a JSON document ({exc})") from None


def read_jsonl(path: str | Path) -> tuple[list[Any], list[str]]:
    """The verified values of a JSON Lines file, and a message per damaged line ("line N of PATH ...")."""
    path = Path(path)
    values, damaged = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(loads_checked(line, f"line {number} of {path}"))
        except json.JSONDecodeError:
            damaged.append(f"line {number} of {path} is damaged: not JSON (torn by a kill, or changed)")
        except DamagedFileError as exc:
            damaged.append(str(exc))
    return values, damaged


def _digest(doc: Any) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
