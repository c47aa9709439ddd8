"""Checkpoints as safetensors (tensors) plus JSON (everything else); nothing is ever unpickled.

A checkpoint is `epoch_NNNN.safetensors` + `epoch_NNNN.json` (after NNNN whole epochs), or
`epoch_NNNN_BBBBBB.*` (a mid-epoch one: BBBBBB batches into the next epoch). The JSON is
written last and records the tensor file's size and SHA-256, so it acts as the commit marker:
a checkpoint whose JSON is missing or does not match its tensors is not a checkpoint. The JSON
carries its own checksum too (`phalanx.files`), so an edited or damaged record is caught.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from phalanx.files import DamagedFileError, loads_checked, remove_temp_files, write_bytes_atomic, write_json_atomic

FORMAT_VERSION = 1
_STEM = re.compile(r"epoch_(\d+)(?:_(\d+))?")
# Files that start a pickle (protocol 2+) or a zip archive (torch.save's format): never loaded here.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says why."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped for an older one."""


# The JSON record's fields and their types; a checkpoint missing one, or with another type, is damaged.
_REQUIRED = {"format_version": int, "epoch": int, "batch": int, "tensors_sha256": str, "tensors_bytes": int}
_OPTIONAL = {"arch": str, "dataset": str, "method": str, "members": int, "fingerprint": str, "config": dict,
             "optimizer": dict, "partial": dict, "classes": int, "input_shape": list}


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


def save_checkpoint(directory: Path, epoch: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    keep: int = 2, *, batch: int = 0) -> Path:
    """Write the checkpoint after `epoch` epochs (and `batch` batches of the next) atomically;
    keep only the newest `keep` ones."""
    directory.mkdir(parents=True, exist_ok=True)
    blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    stem = directory / (f"epoch_{epoch:04d}_{batch:06d}" if batch else f"epoch_{epoch:04d}")
    write_bytes_atomic(stem.with_suffix(".safetensors"), blob)
    record = dict(meta, format_version=FORMAT_VERSION, epoch=epoch, batch=batch,
                  tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
    try:
        write_json_atomic(stem.with_suffix(".json"), record)  # the commit marker: written last
    except BaseException:
        stem.with_suffix(".safetensors").unlink(missing_ok=True)  # never left uncommitted
        raise
    for old in checkpoint_records(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem.with_suffix(".json")


def checkpoint_records(directory: Path) -> list[Path]:
    """The JSON records in `directory`, oldest first (by epoch, then batch)."""
    found = [(tuple(int(g or 0) for g in m.groups()), p) for p in directory.glob("epoch_*.json")
             if (m := _STEM.fullmatch(p.stem))]
    return [p for _, p in sorted(found)]


def discard_incomplete(directory: Path) -> list[Path]:
    """Delete what a write interrupted by a crash can leave: temporary files, and tensor files
    whose JSON record (the commit marker) was never written. Call only while holding the run's lock."""
    removed = remove_temp_files(directory, grace_s=0)
    removed += [p for p in directory.glob("epoch_*.safetensors") if not p.with_suffix(".json").exists()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def refuse_foreign_file(path: Path) -> None:
    """Refuse a pickle or torch.save file (.pt, .pth, ...) given where a checkpoint is expected."""
    if path.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin") or _is_pickle(path):
        raise CheckpointError(f"{path} looks like a pickle/torch.save file; phalanx never unpickles "
                              "(loading one can run arbitrary code) and reads only its own checkpoints: "
                              "a run directory with config.yaml and checkpoints/*.safetensors + *.json")


def read_checkpoint(json_path: Path) -> Checkpoint:
    """Read and verify one checkpoint; refuses a mismatched or damaged pair, and any pickle."""
    json_path = Path(json_path)
    refuse_foreign_file(json_path)
    try:
        text = json_path.read_text()
        meta = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {json_path} is unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {json_path} holds a {type(meta).__name__}, expected a JSON object")
    check_record(meta, json_path)  # a missing or mistyped field is named; any other change, by the checksum
    try:
        meta = loads_checked(text, f"checkpoint {json_path}")
    except DamagedFileError as exc:
        raise CheckpointError(str(exc)) from None
    blob_path = json_path.with_suffix(".safetensors")
    if not blob_path.is_file():
        raise CheckpointError(f"checkpoint {json_path} has no tensor file {blob_path.name}")
    return checkpoint_from_bytes(meta, blob_path.read_bytes(), json_path)


def checkpoint_from_bytes(meta: dict[str, Any], blob: bytes, source: Path) -> Checkpoint:
    """Verify a JSON record against its tensor bytes and decode them (safetensors only)."""
    check_record(meta, source)
    if len(blob) != meta["tensors_bytes"] or hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint tensors of {source} do not match their JSON record (damaged or partial)")
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint {source}: its tensor file is not valid safetensors ({exc})") from None
    return Checkpoint(tensors, meta, source)


def check_record(meta: dict[str, Any], source: Path) -> None:
    """Refuse a JSON record with a missing or mistyped field, or an epoch/batch its name contradicts."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {source} has format {meta.get('format_version')!r}, "
                              f"this phalanx reads {FORMAT_VERSION}")
    for key, kind in (*_REQUIRED.items(), *_OPTIONAL.items()):
        if key not in meta:
            if key in _REQUIRED:
                raise CheckpointError(f"checkpoint {source} lacks the field {key!r} (damaged or not a phalanx checkpoint)")
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            allowed = "an integer >= 0" if kind is int else f"a JSON {kind.__name__}"
            raise CheckpointError(f"checkpoint {source}: field {key!r} = {value!r} is not allowed; expected {allowed}")
    name = _STEM.fullmatch(Path(source).stem) if Path(source).suffix == ".json" else None
    if name is not None and (meta["epoch"], meta["batch"]) != (int(name[1]), int(name[2] or 0)):
        raise CheckpointError(f"checkpoint {source} records epoch {meta['epoch']}, batch {meta['batch']}; "
                              f"its name says epoch {int(name[1])}, batch {int(name[2] or 0)}")


def _is_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest valid checkpoint in `directory`; None if there is none.

    A damaged newer one is skipped with a CheckpointWarning naming it and the epoch used instead;
    when every checkpoint is damaged this refuses (CheckpointError) rather than return None, so
    that no caller silently starts again from zero.
    """
    records = checkpoint_records(directory)
    damaged: list[str] = []
    for json_path in reversed(records):
        try:
            ckpt = read_checkpoint(json_path)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        for reason in damaged:
            warnings.warn(f"{reason}: this damaged checkpoint is skipped; {json_path.name} ({describe(ckpt)}) "
                          "is used instead", CheckpointWarning, stacklevel=2)
        return ckpt
    if damaged:
        raise CheckpointError(f"every checkpoint in {directory} is damaged ({len(damaged)}; the newest: {damaged[0]}); "
                              "refusing to start again from zero: move the run directory away to retrain it")
    return None


def describe(ckpt: Checkpoint) -> str:
    """`epoch E` or `epoch E, batch B` of a checkpoint, for messages."""
    batch = ckpt.meta.get("batch", 0)
    return f"epoch {ckpt.meta['epoch']}" + (f", batch {batch} of the next" if batch else "")


def pack_members(members: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"member{i}.{k}": v for i, m in enumerate(members) for k, v in m.state_dict().items()}


def unpack_members(tensors: Mapping[str, torch.Tensor], members: Sequence[torch.nn.Module]) -> None:
    """Load each member's weights; a shape or key mismatch names the member and the key."""
    for i, member in enumerate(members):
        prefix = f"member{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            member.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"member {i} does not match the checkpoint's weights "
                                  f"(another architecture or dataset?): {first}") from None


def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and plain JSON data."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        plain_state[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                plain_state[str(idx)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                     plain: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
