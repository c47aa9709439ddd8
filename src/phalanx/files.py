"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import fcntl
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
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and flush it to disk (metrics survive a crash)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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
