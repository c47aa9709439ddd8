"""The Python API: every command as a function that takes a user's objects as well as configs.

`train`, `evaluate`, `transfer` and `report` return the JSON documents the CLI writes (`train`
returns its metrics records with the trained members), take members as `nn.Module`s and data as
tensors or a dataset name, and write a run directory only when given one (`out=`). They are thin:
the work is done by the same functions the CLI calls, so both give the same numbers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phalanx.config import (
    TENSOR_DATA, ConfigError, RunConfig, SuiteConfig, from_mapping, read_yaml_mapping, set_key,
    to_mapping,
)
from phalanx.attacks import AttackSpec
from phalanx.errors import UsageError
from phalanx.models import InputSpec, Mixture
from phalanx.models.user import as_member


@dataclass(frozen=True)
class TensorData:
    """A labelled image set held in memory: images in [0, 1] (float) or 0-255 (uint8), N x C x H x W.

    phalanx keeps images as uint8 like every dataset it reads, so float images are rounded to the
    nearest of 256 levels. `num_classes` defaults to the largest label + 1 over both splits.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("x_train", "x_test"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != x.shape[3]:
                raise UsageError(f"{name} must be a tensor of square images, N x C x H x W; got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if x.dtype != torch.uint8 and (not x.is_floating_point() or x.min() < 0 or x.max() > 1):
                raise UsageError(f"{name} must be uint8 (0-255) or floating point in [0, 1]")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise UsageError(f"x_train images are {tuple(self.x_train.shape[1:])}, x_test {tuple(self.x_test.shape[1:])}")
        for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
            y = getattr(self, ys)
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(getattr(self, xs)) \
                    or y.is_floating_point() or (len(y) and int(y.min()) < 0):
                raise UsageError(f"{ys} must be a 1-D integer tensor of labels >= 0, one per image of {xs}")

    @property
    def classes(self) -> int:
        return self.num_classes or int(max(self.y_train.max(), self.y_test.max())) + 1

    def spec(self) -> InputSpec:
        """Shape and per-channel statistics of the training images (for models that normalise)."""
        x = uint8(self.x_train).float().div_(255)
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).clamp(min=1e-6).tolist()
        return InputSpec(x.shape[1], x.shape[2], self.classes, tuple(mean), tuple(std))


def uint8(x: torch.Tensor) -> torch.Tensor:
    """Images as uint8: as they are, or floats in [0, 1] rounded to 256 levels."""
    return x if x.dtype == torch.uint8 else x.mul(255).round_().to(torch.uint8)


def _config(config: str | Path | RunConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None,
            extra: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from a preset name, a YAML path, a mapping or a RunConfig, with `overrides`
    ({"train.epochs": 2, ...}) and the API's own settings applied, validated once."""
    from phalanx.presets import resolve_config_path

    if isinstance(config, RunConfig):
        data = to_mapping(config)
    elif isinstance(config, Mapping):
        data = to_mapping(dict(config))
    elif config is None:
        data = {}
    else:
        data = read_yaml_mapping(resolve_config_path(str(config)), "config file")
    for key, value in {**extra, **(overrides or {})}.items():
        set_key(data, key, value, f"setting {key!r}")
    return from_mapping(RunConfig, data)


@dataclass
class TrainResult:
    """What `train` returns: the trained members (taking pixels in [0, 1], with the input
    normalisation they trained with; a module you passed in is trained in place and is
    `members[i].module`), their mixture, the epoch records of metrics.jsonl, and the run
    directory (None when none was asked for)."""

    members: list[nn.Module]
    ensemble: Mixture
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    run_dir: Path | None


def _member_specs(modules: Sequence[nn.Module]) -> list[dict[str, Any]]:
    """`model.members` for modules passed in: their classes, for the record (and a reload through
    the class, when it builds the same shapes with no arguments)."""
    return [{"factory": f"{type(m).__module__}:{type(m).__qualname__}"} for m in modules]


def train(config: str | Path | RunConfig | Mapping[str, Any] | None = None, *,
          members: Sequence[nn.Module] | None = None, data: str | TensorData | None = None,
          out: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
          progress: bool = False) -> TrainResult:
    """Train an ensemble; see README "Python API".

    `config`: a preset name, a YAML path, a mapping or a RunConfig (defaults when None);
    `overrides`: {"key.path": value} applied on top. `members`: your modules (trained in place;
    the config's `model.members` then records their classes; they get pixels in [0, 1] unless
    overrides set `model.normalize_input: true`); `data`: a dataset name or
    `TensorData`. `out`: the run directory to write (and resume); without it, phalanx trains in a
    temporary directory that is removed before returning.
    """
    from phalanx.data.splits import split_training_data
    from phalanx.train.loop import GivenData, train as train_run
    from phalanx.runs import build_members, read_metrics

    extra: dict[str, Any] = {}
    if isinstance(data, str):
        extra["data.dataset"] = data
    elif data is not None:
        extra["data.dataset"] = TENSOR_DATA
    if members is not None:
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise UsageError("members must be a non-empty sequence of torch.nn.Module")
        extra["model.members"] = _member_specs(members)
        extra["model.normalize_input"] = False  # your module gets pixels in [0, 1], as you wrote it
    cfg = _config(config, overrides, extra)
    given = None
    spec = None
    if isinstance(data, TensorData):
        spec = data.spec()
        split = split_training_data(uint8(data.x_train), data.y_train.long(), cfg.data, cfg.seed,
                                    lambda: (uint8(data.x_test), data.y_test.long()))
        given = GivenData(split, spec, TENSOR_DATA)
    wrapped = None
    if members is not None:
        if spec is None:
            from phalanx.data import dataset_info

            spec = dataset_info(cfg.data.dataset, cfg.data.root).spec
        wrapped = build_members(cfg, spec, modules=members)
    with tempfile.TemporaryDirectory(prefix="phalanx-run-") as tmp:
        run_dir = Path(out) if out is not None else Path(tmp) / "run"
        train_run(cfg, run_dir, progress=progress, members=wrapped, data=given)
        metrics = read_metrics(run_dir)
        if wrapped is None:
            from phalanx.runs import load_members

            wrapped = load_members(run_dir)[0]
    return TrainResult(list(wrapped), Mixture(list(wrapped)).eval(), metrics, to_mapping(cfg),
                       Path(out) if out is not None else None)


def _ensemble(model: Mixture | nn.Module | Sequence[nn.Module], spec: InputSpec) -> Mixture:
    """A Mixture as it is, or your modules as members taking pixels in [0, 1] (no normalisation added)."""
    if isinstance(model, Mixture):
        return model.eval()
    if isinstance(model, nn.Module):
        model = [model]
    if not model or not all(isinstance(m, nn.Module) for m in model):
        raise UsageError("model must be a run directory, a Mixture, or a sequence of torch.nn.Module members")
    return Mixture([as_member(m, spec.raw_pixels()) for m in model]).eval()


def _test_data(data: str | TensorData | tuple[torch.Tensor, torch.Tensor], root: str | None
               ) -> tuple[torch.Tensor, torch.Tensor, InputSpec, str]:
    """Test images (float in [0, 1]) and labels, their input spec (for a bare pair: its shape, the
    largest label + 1 classes, no statistics), and the dataset's name."""
    if isinstance(data, str):
        from phalanx.data import dataset_info, load_dataset

        x, y = load_dataset(data, "test", root)
        return x.float().div(255), y, dataset_info(data, root).spec, data
    if isinstance(data, TensorData):
        return uint8(data.x_test).float().div(255), data.y_test.long(), data.spec(), TENSOR_DATA
    if isinstance(data, tuple) and len(data) == 2:
        x, y = uint8(data[0]).float().div(255), data[1].long()
        spec = InputSpec(x.shape[1], x.shape[2], int(y.max()) + 1, (0.0,) * x.shape[1], (1.0,) * x.shape[1])
        return x, y, spec, TENSOR_DATA
    raise UsageError("data must be a dataset name, a TensorData, or a (test images, labels) pair of tensors")


def evaluate(model: str | Path | Mixture | Sequence[nn.Module], data: str | TensorData | tuple | None = None, *,
             eps: float = 8 / 255, suites: Sequence[str] = ("autoattack", "ensemble"),
             attacks: Sequence[Mapping[str, Any]] = (), examples: int | None = 1000, seed: int = 0,
             batch_size: int = 500, device: str = "cpu", out: str | Path | None = None,
             root: str | None = None) -> dict[str, Any]:
    """White-box robustness of an ensemble: each member and the mixture (average of probabilities).

    `model`: a run directory (its own test split unless `data` is given), a Mixture, or your modules
    (they get pixels in [0, 1]). By default the AutoAttack and ensemble-adaptive suites at `eps`
    (L-inf); `attacks` adds single attacks ({"name": "pgd-linf", "eps": 0.03, ...}). Returns the
    document `phalanx eval` writes (results and sanity checks); writes it to `out` when given.
    """
    from phalanx.eval.sanity import apply_sanity_checks
    from phalanx.eval.whitebox import evaluate_whitebox
    from phalanx.files import write_json_atomic
    from phalanx.device import resolve_device

    suite_cfgs = tuple(from_mapping(SuiteConfig, {"name": s, "eps": eps}, "suites[]") for s in suites)
    attack_cfgs = tuple(AttackSpec.from_mapping(dict(a), "attacks[]") for a in attacks)
    if isinstance(model, (str, Path)) and data is None:
        from phalanx.eval.run_eval import evaluate_run

        return evaluate_run(model, attacks=attack_cfgs, suites=suite_cfgs, examples=examples, device=device)
    if data is None:
        raise UsageError("data is needed to evaluate modules: a dataset name, a TensorData or (images, labels)")
    dev = resolve_device(device)
    x, y, spec, dataset = _test_data(data, root)
    if isinstance(model, (str, Path)):
        from phalanx.runs import load_run

        mixture = load_run(model)
    else:
        mixture = _ensemble(model, spec)
    mixture = mixture.to(dev)
    records = evaluate_whitebox(mixture, x.to(dev), y.to(dev), attack_cfgs, examples=examples, seed=seed,
                                batch_size=batch_size, suites=suite_cfgs)
    doc = {"kind": "white-box", "run": str(model) if isinstance(model, (str, Path)) else None,
           "dataset": dataset, "dataset_display": dataset, "method": None, "arch": None, "epoch": None,
           "device": str(dev), "results": records, "sanity": apply_sanity_checks(records)}
    if out is not None:
        write_json_atomic(Path(out), doc)
    return doc


def transfer(surrogate: str | Path | Sequence[nn.Module], target: str | Path | Sequence[nn.Module],
             data: str | TensorData | tuple | None = None, *, attacks: Sequence[Mapping[str, Any]] | None = None,
             examples: int | None = 1000, seed: int = 0, batch_size: int = 500, device: str = "cpu",
             root: str | None = None) -> dict[str, Any]:
    """Black-box transfer: adversarial examples crafted on `surrogate` (white-box, on the average of
    its members' losses), then the accuracy of `target`'s members and mixture on them, with the
    per-example worst case. Run directories or modules for either; `attacks` default to the GAL
    paper's transfer set for the dataset (the CIFAR-10 one for tensors). Returns the document
    `phalanx eval --transfer-from` writes (no file is written)."""
    from phalanx.eval.sanity import apply_sanity_checks
    from phalanx.eval.transfer import GAL_TRANSFER_ATTACKS, craft_on_surrogate, describe_attack, transfer_records
    from phalanx.runs import open_run, read_run_config
    from phalanx.device import resolve_device

    if data is None:
        run = next((r for r in (target, surrogate) if isinstance(r, (str, Path))), None)
        if run is None:
            raise UsageError("data is needed when neither surrogate nor target is a run directory")
        cfg = read_run_config(run)
        data, root = cfg.data.dataset, cfg.data.root
    dev = resolve_device(device)
    x, y, spec, dataset = _test_data(data, root)
    n = len(y) if examples is None else min(examples, len(y))
    x, y = x[:n].to(dev), y[:n].to(dev)

    def members_of(side: str | Path | Sequence[nn.Module]) -> list[nn.Module]:
        if isinstance(side, (str, Path)):
            return list(open_run(side, str(dev)).members)
        return [m.to(dev).eval() for m in _ensemble(side, spec).members]

    default = GAL_TRANSFER_ATTACKS.get(dataset, GAL_TRANSFER_ATTACKS["cifar10"])
    specs = default if attacks is None else tuple(AttackSpec.from_mapping(dict(a), "attacks[]") for a in attacks)
    crafted = craft_on_surrogate(members_of(surrogate), x, y, specs, seed=seed, batch_size=batch_size)
    described = [(describe_attack(s), a) for s, a in zip(specs, crafted)]
    records = transfer_records(Mixture(members_of(target)).eval(), x, y, described, source="transfer:surrogate",
                               seed=seed, batch_size=batch_size)
    return {"kind": "transfer", "dataset": dataset, "source": "transfer:surrogate", "device": str(dev),
            "results": records, "sanity": apply_sanity_checks(records, white_box=False)}


def report(run_dirs: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> dict[str, Path]:
    """Write the Markdown + HTML report of run directories into `out` (as `phalanx report`);
    returns {"markdown": path, "html": path}."""
    from phalanx.report.render import write_report

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    md, html = write_report(list(run_dirs), out, title=title)
    return {"markdown": md, "html": html}


__all__ = ["ConfigError", "TensorData", "TrainResult", "evaluate", "report", "train", "transfer"]
