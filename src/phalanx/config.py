"""Run configuration: frozen dataclasses loaded from YAML, validated on the way in.

Every section is a dataclass; `from_mapping` refuses unknown keys and wrong types with a
message naming the key path and what is allowed, so a typo never silently falls back to a
default. Method-specific parameters live in `method`, validated by that method's own config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:  # imported where used: config is a foundation layer, phalanx.attacks needs torch
    from phalanx.attacks import AttackSpec


class ConfigError(ValueError):
    """A configuration value or key that is not allowed; the message says what is."""


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 0
    flip: bool = False
    noise_std: float = 0.0
    noise: Literal["gaussian", "truncated"] = "gaussian"

    def __post_init__(self) -> None:
        check(self.crop_padding >= 0, "data.augment.crop_padding", self.crop_padding, "an integer >= 0")
        check(self.noise_std >= 0, "data.augment.noise_std", self.noise_std, "a number >= 0")


# `data.dataset` of a run trained on tensors passed to the Python API (phalanx.api.train): its data
# are not on disk, so only the API (given the tensors again) can evaluate it.
TENSOR_DATA = "tensors"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    allow_noncanonical: bool = False
    val_size: int = 0  # examples held out of the training split for validation; 0 uses the test split
    # which ones: a seeded random draw, or the first val_size images (the DVERGE report's code:
    # its course template's get_validation_loader holds out indices[:1024] of the training split)
    val_from: Literal["random", "head"] = "random"
    train_subset: int | None = None  # first N training examples only (quick runs)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        from phalanx.data import DatasetName

        check(self.dataset in {d.value for d in DatasetName} or self.dataset == TENSOR_DATA, "data.dataset",
              self.dataset, f"one of {[d.value for d in DatasetName]}")
        check(self.val_size >= 0, "data.val_size", self.val_size, "an integer >= 0")
        check(self.train_subset is None or self.train_subset > 0, "data.train_subset", self.train_subset,
              "null or an integer > 0")


def _check_architecture(arch: str | None, factory: str | None, activation: str | None, where: str) -> None:
    from phalanx.models import Activation, Arch

    check(arch is None or arch in {a.value for a in Arch}, f"{where}.arch", arch,
          f"one of {[a.value for a in Arch]} (unknown architecture {arch!r}), or a model.factory")
    check(factory is None or re.fullmatch(r"[\w.]+:[\w.<>]+", factory) is not None, f"{where}.factory", factory,
          "null or 'package.module:callable' (an importable function or class returning a torch.nn.Module)")
    check(activation is None or activation in {a.value for a in Activation}, f"{where}.activation",
          activation, f"null or one of {[a.value for a in Activation]}")


@dataclass(frozen=True)
class MemberConfig:
    """One member of a mixed ensemble (`model.members` as a list): a built-in `arch`, or a user's
    `factory` called with `kwargs`; `layers` are the taps DVERGE may draw (empty: discovered)."""

    arch: str | None = None
    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    activation: str | None = None
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check((self.arch is None) != (self.factory is None), "model.members[]", to_mapping(self),
              "exactly one of arch (a built-in architecture) or factory ('package.module:callable')")
        _check_architecture(self.arch, self.factory, self.activation, "model.members[]")
        check(self.factory is not None or (not self.kwargs and not self.layers), "model.members[]",
              to_mapping(self), "kwargs and layers only with a factory (a built-in architecture knows its own)")

    @property
    def label(self) -> str:
        return self.arch or str(self.factory)


@dataclass(frozen=True)
class ModelConfig:
    """The members: `members` copies of one architecture, or a list of member specs (a mixed ensemble).

    `arch` names a built-in architecture; `factory` ('package.module:callable', called with
    `kwargs`) a user's model instead, imported only because it is named here.
    """

    arch: str = "conv"
    activation: str | None = None  # null: the architecture's default (see phalanx.models)
    members: int | tuple[MemberConfig, ...] = 3
    # false: the model takes raw [0, 1] pixels without per-channel standardisation (the DVERGE
    # report's Conv, whose model.py applies no transform but ToTensor)
    normalize_input: bool = True
    factory: str | None = None  # a user's model; replaces arch
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    layers: tuple[str, ...] = ()  # a user model's taps (module paths); empty: discovered from its forward

    def __post_init__(self) -> None:
        _check_architecture(self.arch, self.factory, self.activation, "model")
        if isinstance(self.members, int):
            check(self.members >= 1, "model.members", self.members,
                  "an integer >= 1, or a list of members ({arch: ...} or {factory: ...})")
        else:
            check(len(self.members) >= 1, "model.members", [], "an integer >= 1 or a non-empty list of members")
        check(self.factory is not None or (not self.kwargs and not self.layers), "model", "kwargs/layers",
              "model.kwargs and model.layers only with model.factory (a built-in architecture knows its own)")

    @property
    def count(self) -> int:
        """How many members the ensemble has."""
        return self.members if isinstance(self.members, int) else len(self.members)

    def member_specs(self) -> tuple[MemberConfig, ...]:
        """One spec per member: the list as given, or `members` copies of the top-level model."""
        if not isinstance(self.members, int):
            return tuple(m if m.activation is not None or m.factory else
                         dataclasses.replace(m, activation=self.activation) for m in self.members)
        if self.factory is not None:
            one = MemberConfig(factory=self.factory, kwargs=self.kwargs, layers=self.layers)
        else:
            one = MemberConfig(arch=self.arch, activation=self.activation)
        return (one,) * self.members

    @property
    def label(self) -> str:
        """The architecture for tables: 'conv', 'mypkg.nets:resnet18', or 'conv+conv4+resnet20' (mixed)."""
        return "+".join(dict.fromkeys(m.label for m in self.member_specs()))


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "cosine"] = "constant"
    milestones: tuple[int, ...] = ()  # epochs at which the step schedule multiplies lr by gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a number in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        check(self.gamma > 0, "optim.gamma", self.gamma, "a number > 0")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "baseline"
    epochs: int = 30
    batch_size: int = 32
    init_from: str | None = None  # a run directory whose members' weights start this run
    keep_checkpoints: int = 2
    diagnostics_every: int = 0  # epochs between method diagnostics (0: never)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps mid-epoch (0: epoch ends only)
    # bfloat16: the method's forward passes (attacks and distillation included) under autocast;
    # parameters, optimizer state and checkpoints stay float32. Speed only (ResNet-20 DVERGE
    # step 1.2-1.8x faster on this CPU, benchmarks/RESULTS.md); float32 is the papers' setting.
    precision: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        check(self.diagnostics_every >= 0, "train.diagnostics_every", self.diagnostics_every, "an integer >= 0")
        check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", self.checkpoint_every_steps,
              "an integer >= 0 (0: checkpoint at epoch ends only)")


@dataclass(frozen=True)
class SuiteConfig:
    """A suite of attacks run at one eps (phalanx.eval.suites): `autoattack` (AutoAttack's standard
    sequence) or `ensemble` (the ensemble-adaptive objectives); on every model or the mixture only."""

    name: Literal["autoattack", "ensemble"]
    eps: float
    norm: Literal["linf", "l2"] = "linf"
    models: Literal["all", "mixture"] = "all"

    def __post_init__(self) -> None:
        check(math.isfinite(self.eps) and 0 <= self.eps <= (1 if self.norm == "linf" else 1e3),
              "eval.suites[].eps", self.eps, "a number in [0, 1] for linf, >= 0 for l2")


def _report_attacks() -> tuple[AttackSpec, ...]:
    from phalanx.attacks import report_attacks

    return report_attacks(scripted=False)


@dataclass(frozen=True)
class EvalConfig:
    # each entry {name, eps} and the step parameters its attack takes (`AttackSpec.from_mapping`);
    # by default the DVERGE report's stated evaluation (FGSM, PGD-Linf and PGD-L2)
    attacks: tuple[AttackSpec, ...] = field(default_factory=_report_attacks)
    suites: tuple[SuiteConfig, ...] = ()  # attack suites run after `attacks` (per-example worst case over all)
    examples: int | None = 1000  # test examples attacked (null: the whole test split)
    clean_repeats: int = 1  # clean accuracy averaged over this many random subsets of `examples`
    batch_size: int = 500
    transfer_from: str | None = None  # preset of the surrogate whose examples `phalanx reproduce` transfers
    # how `phalanx eval` measures (phalanx.eval.protocols): standard, or a source's own protocol
    protocol: Literal["standard", "dverge-report", "dverge-authors", "gal-paper"] = "standard"

    def __post_init__(self) -> None:
        check(self.examples is None or self.examples >= 1, "eval.examples", self.examples, "null or an integer >= 1")
        check(self.clean_repeats >= 1, "eval.clean_repeats", self.clean_repeats, "an integer >= 1")
        check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Mapping[str, Any] = field(default_factory=dict)  # validated by the method's own config
    eval: EvalConfig = field(default_factory=EvalConfig)
    paper: Mapping[str, Any] = field(default_factory=dict)  # the numbers a preset reproduces, for side-by-side tables
    reproduce_from: str | None = None  # preset whose run gives train.init_from in `phalanx reproduce`

    def __post_init__(self) -> None:
        check(valid_run_name(self.name), "name", self.name, RUN_NAME_RULE)
        check(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        check(valid_device(self.device), "device", self.device, DEVICE_RULE)


# Seeds: torch takes 64-bit seeds and member i is seeded with seed * 1000 + i; 2**32 - 1 (numpy's
# limit) leaves room for both and is more than any experiment needs.
MAX_SEED = 2**32 - 1
RUN_NAME_RULE = "a folder name: not empty, no '/' or '\\', not starting with '.'"
DEVICE_RULE = "auto, cpu, cuda or cuda:N"


def valid_run_name(name: str) -> bool:
    """`name` becomes a folder (runs/NAME-TIMESTAMP): one path component that cannot escape."""
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".")


def valid_device(name: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


def check(ok: bool, key: str, value: object, allowed: str) -> None:
    """Refuse `value` of `key` unless `ok`, saying what `allowed` values are."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


def from_mapping(cls: type, data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, refusing unknown keys and wrong types. A type
    with its own mapping form (a classmethod `from_mapping(data, path)`: attacks.AttackSpec) reads itself."""
    own = getattr(cls, "from_mapping", None)
    if own is not None:
        return own(data, path)
    kwargs = read_fields(data, _field_types(cls), path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a section's own checks (e.g. a method config)
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def read_fields(data: Mapping[str, Any] | None, types: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The items of mapping `data`, each coerced to its type in `types` (key -> type hint); a key
    not in `types` or a value of another type raises ConfigError naming it."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - set(types))
    if unknown:
        where = f"in {path} " if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; allowed keys: {sorted(types)}")
    return {key: _coerce(types[key], value, f"{path}.{key}" if path else key) for key, value in data.items()}


def _field_types(cls: type) -> dict[str, Any]:
    from phalanx.attacks import AttackSpec  # the one section type from a layer above config

    hints = typing.get_type_hints(cls, localns={"AttackSpec": AttackSpec})
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append((_same_kind(option, value), str(exc)))
        # the error of the option the value was meant for (a list's, for a list), else the first's
        raise ConfigError(max(errors, key=lambda e: e[0])[1])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path} = {value!r} is not allowed; expected one of {list(allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a list")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a mapping")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a number")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):  # no setting takes an infinite or NaN value: one check for all
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a string")
        return value
    return value


def _same_kind(tp: Any, value: Any) -> bool:
    """Whether `value` is the kind of data type `tp` reads (a list for a tuple, a mapping for a section)."""
    if isinstance(value, (list, tuple)):
        return typing.get_origin(tp) is tuple
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (Mapping, dict)
    return False


def to_mapping(obj: Any) -> Any:
    """Plain, YAML-ready data (tuples become lists); a type with its own mapping form (a method
    `to_mapping()`: attacks.AttackSpec) writes itself."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "to_mapping"):
            return to_mapping(obj.to_mapping())
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not allowed; expected KEY.PATH=VALUE, e.g. train.epochs=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({first})") from None
        set_key(data, key, value, f"--set {item!r}")
    return data


def set_key(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `key.path` of a nested mapping to `value`, creating sections on the way; `where` names
    the setting in the error when a part of the path is not a section."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML preset (or defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = read_yaml_mapping(path, "config file")
    return from_mapping(RunConfig, apply_overrides(data, overrides or []))


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; an unreadable, binary or invalid file is refused by name."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(path)!r} is not a text (UTF-8) file") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping at top level")
    return data


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False)


# Keys that do not change the trained weights, left out of a run's fingerprint: the run's label,
# where it runs, where its data lives and how it is evaluated or checkpointed. Every other key
# (data, model, optim, train, method, seed) determines the weights.
FINGERPRINT_EXCLUDED = ("name", "device", "eval", "paper", "reproduce_from", "data.root", "data.download",
                        "train.keep_checkpoints", "train.checkpoint_every_steps")


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The flattened `key.path: value` items of `cfg` that determine a run's weights."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix in FINGERPRINT_EXCLUDED:
            return
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(to_mapping(cfg), "")
    for key, unset in UNSET_KEYS:  # absent from runs made before these keys existed: same weights
        if key in flat and flat[key] == unset:
            del flat[key]
    return flat


# Keys added after runs were made, left out of the identity at their default so that those runs'
# fingerprints (and results/ that cite them) stay valid.
UNSET_KEYS: tuple[tuple[str, Any], ...] = (("model.factory", None), ("model.kwargs", {}), ("model.layers", []))


def fingerprint(cfg: RunConfig) -> str:
    """SHA-256 of `identity(cfg)` as canonical JSON: equal for two configs that train the same weights."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()


def identity_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """`key: a_value vs b_value` for every identity key on which `a` and `b` differ."""
    ia, ib = identity(a), identity(b)
    return [f"{k} = {ia.get(k, '(absent)')!r} vs {ib.get(k, '(absent)')!r}"
            for k in sorted(set(ia) | set(ib)) if ia.get(k, "(absent)") != ib.get(k, "(absent)")]

