"""Run directories: one folder per training run holding everything about it (DESIGN.md).

Layout: `config.yaml` (fully resolved), `metrics.jsonl`, `checkpoints/` (safetensors + JSON),
`eval/*.json`, `report.md`, `figures/*.png`.
"""

from __future__ import annotations


import fcntl
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from phalanx.checkpoint import (
    Checkpoint, CheckpointError, describe, latest_checkpoint, refuse_foreign_file, unpack_members,
)
from phalanx.config import (
    ConfigError, RunConfig, dump_config, fingerprint, from_mapping, identity_differences, read_yaml_mapping,
)
from phalanx.device import resolve_device
from phalanx.files import (
    DamagedFileWarning, is_temp_name, read_jsonl, remove_temp_files, write_json_atomic, write_text_atomic,
)
from phalanx.models import Classifier, InputSpec, Mixture, build_model
from phalanx.models.user import as_member, build_user_model

if TYPE_CHECKING:
    from phalanx.data import LoadedSplit  # data imports models; runs reads data lazily


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says why."""


class RunInUseWarning(UserWarning):
    """A run is read while another process trains it."""


LOCK_FILE = ".lock"  # holds the pid of the process training the run, locked (flock) while it does


def config_path(run_dir: Path) -> Path:
    return run_dir / "config.yaml"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def eval_dir(run_dir: str | Path) -> Path:
    """Where `phalanx eval` keeps its JSON documents (whitebox.json, transfer*.json, protocols)."""
    return Path(run_dir) / "eval"


def analysis_path(run_dir: str | Path) -> Path:
    """The gradient analysis `phalanx analyze` writes."""
    return Path(run_dir) / "analysis" / "gradients.json"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.jsonl"


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        refuse_foreign_file(run_dir)
        raise RunDirError(f"{run_dir} is a file; expected a phalanx run directory (with config.yaml)")
    path = config_path(run_dir)
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a phalanx run directory (no config.yaml)")
    data = read_yaml_mapping(path, "run config")
    try:
        return from_mapping(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"run config {str(path)!r}: {exc}") from None


def check_run_dir(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether `run_dir` may hold a run of `cfg`, without writing anything; True when it already does.

    Allowed: a folder that does not exist, an empty one (or one holding only phalanx's lock file and
    temporary files of config.yaml, which a killed first write leaves),
    or a phalanx run of the same configuration. Refused: a file, a run of another configuration,
    and any other folder, so that phalanx never writes into (or cleans up) a folder of the user's.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file; --out must be a new or empty folder, or a phalanx run directory")
    path = config_path(run_dir)
    if path.is_file():
        if path.read_bytes() != dump_config(cfg).encode() and not _same_config(path, cfg):
            raise RunDirError(f"{run_dir} holds a run with another configuration; choose a new --out "
                              f"or delete it (compare {path} with the new settings)")
        return True
    if run_dir.is_dir():
        # a write of config.yaml killed before its rename leaves a temporary file: still an empty run
        found = sorted(p.name for p in run_dir.iterdir()
                       if p.name != LOCK_FILE and not is_temp_name(p.name, config_path(run_dir).name))
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise RunDirError(f"{run_dir} is not a phalanx run (no config.yaml) and not empty (it holds {shown}); "
                              "--out must be a new or empty folder, or a phalanx run directory")
    return False


def prepare_run_dir(run_dir: Path, cfg: RunConfig) -> bool:
    """Create `run_dir` for `cfg`, or accept it for resuming; True when it already holds this run."""
    if check_run_dir(run_dir, cfg):
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path(run_dir), dump_config(cfg))
    return False


def _same_config(path: Path, cfg: RunConfig) -> bool:
    """Whether a saved config means `cfg` (it may predate a new key whose default it then takes)."""
    try:
        return from_mapping(RunConfig, yaml.safe_load(path.read_text())) == cfg
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError):
        return False


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` so two processes never write the same run; the lock file
    holds this process's id meanwhile (`run_in_use` reads it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir} is in use by another phalanx process{_pid_text(run_dir)}; "
                              "wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def run_in_use(run_dir: str | Path) -> int | None:
    """The id of the process training `run_dir` now (0 when it holds the lock but wrote no id), or None."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)


def _pid_text(run_dir: Path) -> str:
    pid = run_in_use(run_dir)
    return f" (process {pid})" if pid else ""


def warn_if_in_use(run_dir: Path, reading: str) -> None:
    """Warn that `run_dir` is being trained now, saying what of it is read (e.g. "epoch 3")."""
    pid = run_in_use(run_dir)
    if pid is not None:
        warnings.warn(f"{run_dir} is being trained now{f' (process {pid})' if pid else ''}; reading {reading}, "
                      "later epochs are not included", RunInUseWarning, stacklevel=3)


def check_identity(run_dir: Path, cfg: RunConfig, ckpt: Checkpoint) -> None:
    """Refuse a checkpoint that was not trained with `cfg` (run_dir's config.yaml), naming the keys.

    New checkpoints carry `fingerprint` (config.fingerprint) and the resolved `config`; those of
    older phalanx versions carry `config` only (compared the same way), or neither (then only their
    arch, members and dataset, when present, are compared, and the weights' shapes when loaded).
    """
    meta = ckpt.meta
    if meta.get("fingerprint") == fingerprint(cfg):
        return
    stored = None
    if isinstance(meta.get("config"), dict):
        try:
            stored = from_mapping(RunConfig, meta["config"])
        except ConfigError:
            stored = None
    if stored is not None:
        diffs = identity_differences(cfg, stored)
    else:
        pairs = (("model.arch", cfg.model.label, meta.get("arch")), ("model.members", cfg.model.count,
                 meta.get("members")), ("data.dataset", cfg.data.dataset, meta.get("dataset")))
        diffs = [f"{k} = {a!r} vs {b!r}" for k, a, b in pairs if b is not None and a != b]
        if not diffs and "fingerprint" in meta:
            diffs = ["(its stored configuration is unreadable)"]
    if diffs:
        raise CheckpointError(f"{config_path(run_dir)} does not match the checkpoint {ckpt.path} it should have "
                              f"trained ({'; '.join(diffs)}: config.yaml, then the checkpoint); was config.yaml "
                              "edited, or do the checkpoints come from another run?")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of `metrics.jsonl`, each verified; a damaged line is skipped with a warning."""
    path = metrics_path(Path(run_dir))
    if not path.is_file():
        return []
    records, damaged = read_jsonl(path)
    for message in damaged:
        warnings.warn(f"{message}: this record is skipped", DamagedFileWarning, stacklevel=2)
    return records


def build_members(cfg: RunConfig, spec: InputSpec, modules: Sequence[torch.nn.Module] | None = None
                  ) -> list[Classifier]:
    """Freshly initialized members; member i is seeded with (seed, i) so runs are reproducible.
    With `model.normalize_input` false the members see raw [0, 1] pixels (mean 0, std 1).
    `modules` (a user's own, as they are) are wrapped instead of building the config's members."""
    if not cfg.model.normalize_input:
        spec = spec.raw_pixels()
    if modules is not None:
        return [as_member(m, spec) for m in modules]
    members: list[Classifier] = []
    for i, member in enumerate(cfg.model.member_specs()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + i)
            if member.factory is not None:
                members.append(build_user_model(member.factory, member.kwargs, spec, member.layers))
            else:
                members.append(build_model(str(member.arch), spec, member.activation))
    return members


def stored_spec(meta: dict[str, Any]) -> InputSpec | None:
    """The input spec a checkpoint was trained with (kept since user models and tensor data: neither
    can be looked up by dataset name); None for older checkpoints or a malformed entry."""
    raw = meta.get("input_spec")
    try:
        return InputSpec(int(raw["channels"]), int(raw["size"]), int(raw["num_classes"]),
                         tuple(map(float, raw["mean"])), tuple(map(float, raw["std"])))
    except (TypeError, KeyError, ValueError):
        return None


def load_members(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[list[Classifier], RunConfig, dict]:
    """The members of a run at its latest checkpoint, with the run's config and checkpoint metadata."""
    from phalanx.data import dataset_info

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt = latest_checkpoint(checkpoint_dir(run_dir))
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet")
    check_identity(run_dir, cfg, ckpt)
    warn_if_in_use(run_dir, f"its checkpoint at {describe(ckpt)} ({ckpt.path.name})")
    members = build_members(cfg, stored_spec(ckpt.meta) or dataset_info(cfg.data.dataset, cfg.data.root).spec)
    unpack_members(ckpt.tensors, members)
    return [m.to(device) for m in members], cfg, ckpt.meta


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with parameters that take no gradient, for good: a fixed function of its
    input (a static model or a teacher; an attack freezes only for its duration, `attacks.attack_mode`)."""
    return model.eval().requires_grad_(False)


def load_frozen_members(run_dir: str | Path) -> list[Classifier]:
    """The members of a finished run (latest checkpoint), on the CPU, `frozen`: the one loader of
    every static model (EnsAdv) and teacher (RRM, KD)."""
    return [frozen(m) for m in load_members(run_dir, "cpu")[0]]


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Mixture:
    """The trained Mixture of a run directory, in eval mode, ready for evaluation. Never unpickles."""
    members, _, _ = load_members(run_dir, device)
    return Mixture(members).eval()


@dataclass
class OpenRun:
    """A trained run opened for evaluation (`open_run`): its members on `device` in eval mode, its
    config and checkpoint metadata, and its test split, read from disk once when first asked for."""

    run_dir: Path
    cfg: RunConfig
    members: list[Classifier]
    meta: dict[str, Any]
    device: torch.device
    _test: LoadedSplit | None = field(default=None, repr=False)

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def mixture(self) -> Mixture:
        """The members' average of probabilities, in eval mode."""
        return Mixture(self.members).eval()

    def test_split(self) -> LoadedSplit:
        """The run's test split as loaded (`data.LoadedSplit`: uint8 images on the CPU, labels, copy)."""
        if self._test is None:
            from phalanx.data import load_split

            data = self.cfg.data
            self._test = load_split(data.dataset, "test", data.root, download=data.download,
                                    allow_noncanonical=data.allow_noncanonical)
        return self._test

    def test_images(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` test images (all when None) on the run's device, in [0, 1], with labels."""
        split = self.test_split()
        x, y = split.images[:count], split.labels[:count]
        return x.to(self.device).float().div_(255), y.to(self.device)

    def dataset_display(self) -> str:
        """The dataset's name for tables, saying which copy of it the test split is."""
        from phalanx.data import display_name

        return display_name(self.cfg.data.dataset, self.cfg.data.root, self.test_split().copy)


def open_run(run_dir: str | Path, device: str | None = None) -> OpenRun:
    """The one way to open a trained run for evaluation: members of its latest checkpoint on `device`
    (None: the run's own `device` setting), in eval mode. A bad `device` is refused before anything
    is read."""
    if device is not None:
        resolve_device(device)
    members, cfg, meta = load_members(run_dir, "cpu")
    dev = resolve_device(device or cfg.device)
    return OpenRun(Path(run_dir), cfg, [m.to(dev).eval() for m in members], meta, dev)


def write_eval_json(run_dir: str | Path, name: str, doc: Any) -> Path:
    """Write `eval/NAME` of a run atomically, first removing what killed writes left in `eval/`."""
    folder = eval_dir(run_dir)
    if folder.is_dir():
        remove_temp_files(folder)
    path = folder / name
    write_json_atomic(path, doc)
    return path
