"""The league: every ensemble defense of one architecture, dataset and training budget, measured
under one protocol and shown in one table.

Each defense (baseline, ADP, GAL, DVERGE, TRS, GDR) is trained from its base preset (by default
the quickstart's), with what the league fixes for all of them: dataset and data, architecture,
member count, seed, epochs and, when given, batch size. A step schedule's milestones and TRS's
`delta_epochs` count epochs, so they are scaled with the budget. DVERGE starts, as in the DVERGE
authors' code (`--start-from baseline`), from the league's trained baseline; its training time
then includes the baseline's. A separately trained baseline ensemble of another seed, the
surrogate, crafts the black-box examples and is not a defense.

The protocol, the same for every defense:
- clean accuracy of the mixture;
- white-box: the per-example worst case over AutoAttack's standard suite and the ensemble-adaptive
  suite, both on the mixture at the league's eps (the `strongest` record of `evaluate_run`);
- black-box: the per-example worst case over the DVERGE authors' transfer attacks at the league's
  eps (PGD-Linf 100 steps of eps/5, M-DI²-FGSM, and SGM when the surrogate is a ResNet), crafted
  once on the surrogate and replayed on every defense;
- the same test images for all of them (the first `examples` of the test split);
- training time: the sum of the `epoch_seconds` of each run's metrics.jsonl.
Every accuracy carries its n and 95% Wilson interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.config import (
    MAX_SEED, RUN_NAME_RULE, AugmentConfig, ConfigError, RunConfig, SuiteConfig, apply_overrides, from_mapping,
    read_yaml_mapping, set_key, to_mapping, valid_device, valid_run_name,
)

ALL_METHODS: tuple[str, ...] = ("baseline", "adp", "gal", "dverge", "trs", "gdr")

# Each method's base run config when the league names none: the quickstart presets.
DEFAULT_PRESETS: dict[str, str] = {m: f"quickstart/{m}" for m in ALL_METHODS}

SURROGATE = "surrogate"  # the run that crafts the transfer examples (a baseline of another seed)
EVERY_RUN = "all"  # the `overrides` entry applied to every run, surrogate included

# What the league sets for every run; an override of one of these would break "one budget, one
# architecture, one dataset", so it is refused.
LEAGUE_KEYS = ("name", "seed", "device", "data", "model.arch", "model.members", "train.method", "train.epochs",
               "train.init_from")

# Keys of a base preset that count epochs: scaled by league epochs / the preset's epochs.
EPOCH_COUNTING_KEYS = ("optim.milestones", "method.delta_epochs")

# What the league's output folder may hold besides the runs.
OUTPUT_FILES = ("league.json", "league.md", "league.png", "transfer")


@dataclass(frozen=True)
class LeagueData:
    """The data every run of the league trains on (`data` of each run config, with `dataset`)."""

    root: str | None = None
    download: bool = False
    allow_noncanonical: bool = False
    train_subset: int | None = None  # the first N training examples only
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check(self.train_subset is None or self.train_subset > 0, "data.train_subset", self.train_subset,
               "null or an integer > 0")


@dataclass(frozen=True)
class LeagueConfig:
    """A league: which defenses, on what, for how long, measured at which eps on how many examples.

    - `methods`: the defenses, in table order (any of ALL_METHODS).
    - `presets`: a method's base run config (a preset name or YAML path) where it is not the
      quickstart's; its `train.method` must be that method.
    - `overrides`: per method, or `all` for every run, run-config values set after the league's own
      (`{method.noise_eps: 0.09}` or nested mappings); the keys in LEAGUE_KEYS are the league's.
    - `start_from_baseline`: methods that start from the league's trained baseline run.
    - `surrogate_seed`: the surrogate's seed; it is otherwise the baseline run (preset and overrides).
    - `examples`: test examples evaluated (null: the whole test split).
    - `batch_size`: null keeps each base preset's own.
    """

    name: str = "league"
    dataset: str = "digits"
    arch: str = "conv"
    members: int = 3
    epochs: int = 15
    batch_size: int | None = None
    seed: int = 0
    surrogate_seed: int = 100
    eps: float = 0.1
    examples: int | None = None
    methods: tuple[str, ...] = ALL_METHODS
    start_from_baseline: tuple[str, ...] = ("dverge",)
    presets: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    data: LeagueData = field(default_factory=LeagueData)
    device: str = "auto"

    def __post_init__(self) -> None:
        from phalanx.data import DatasetName
        from phalanx.models import Arch

        _check(valid_run_name(self.name), "name", self.name, RUN_NAME_RULE)
        _check(self.dataset in {d.value for d in DatasetName}, "dataset", self.dataset,
               f"one of {[d.value for d in DatasetName]}")
        _check(self.arch in {a.value for a in Arch}, "arch", self.arch, f"one of {[a.value for a in Arch]}")
        _check(self.members >= 2, "members", self.members, "an integer >= 2 (diversity compares members)")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size", self.batch_size,
               "null (each preset's own) or an integer >= 1")
        for key in ("seed", "surrogate_seed"):
            value = getattr(self, key)
            _check(0 <= value <= MAX_SEED, key, value, f"an integer in [0, {MAX_SEED}]")
        _check(self.surrogate_seed != self.seed, "surrogate_seed", self.surrogate_seed,
               f"a seed other than the defenses' ({self.seed}): the surrogate is trained separately")
        _check(0 < self.eps <= 1, "eps", self.eps, "a number in (0, 1] (an Linf budget in pixels)")
        _check(self.examples is None or self.examples >= 1, "examples", self.examples,
               "null (the whole test split) or an integer >= 1")
        _check(bool(self.methods), "methods", list(self.methods), f"a non-empty list of {list(ALL_METHODS)}")
        for i, method in enumerate(self.methods):
            _check(method in ALL_METHODS, f"methods[{i}]", method, f"one of {list(ALL_METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "methods", list(self.methods), "each method once")
        for i, method in enumerate(self.start_from_baseline):
            _check(method in ALL_METHODS and method != "baseline", f"start_from_baseline[{i}]", method,
                   f"one of {[m for m in ALL_METHODS if m != 'baseline']}")
        for method, preset in self.presets.items():
            _check(method in ALL_METHODS, "presets", method, f"keys among {list(ALL_METHODS)}")
            _check(isinstance(preset, str) and bool(preset), f"presets.{method}", preset,
                   "a preset name or a YAML file")
        for key, values in self.overrides.items():
            _check(key in ALL_METHODS or key == EVERY_RUN, "overrides", key,
                   f"keys among {[*ALL_METHODS, EVERY_RUN]}")
            _check(isinstance(values, Mapping), f"overrides.{key}", values,
                   "a mapping of run-config keys to values, e.g. {method.noise_eps: 0.09}")
            for path, _ in _leaf_items(values):
                owned = next((k for k in LEAGUE_KEYS if path == k or path.startswith(k + ".")), None)
                if owned is None and self.batch_size is not None and path == "train.batch_size":
                    owned = "train.batch_size"
                _check(owned is None, f"overrides.{key}", path,
                       f"a key the league does not set itself (it sets {', '.join(LEAGUE_KEYS)}"
                       f"{' and train.batch_size' if self.batch_size is not None else ''}: change the league's "
                       "own value instead)")
        _check(valid_device(self.device), "device", self.device, "auto, cpu, cuda or cuda:N")

    def preset(self, method: str) -> str:
        return self.presets.get(method, DEFAULT_PRESETS[method])


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


def _leaf_items(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every value in a mapping that may nest mappings or use dotted keys."""
    items = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        items += _leaf_items(value, path) if isinstance(value, Mapping) and value else [(path, value)]
    return items


def load_league_config(path: str | Path, overrides: list[str] | None = None) -> LeagueConfig:
    """Read a league YAML file, apply `--set KEY=VALUE` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"league config {str(path)!r} does not exist")
    data = read_yaml_mapping(path, "league config")
    return from_mapping(LeagueConfig, apply_overrides(data, overrides or []))


# --- the runs ------------------------------------------------------------------------------------

def run_labels(cfg: LeagueConfig) -> list[str]:
    """The runs a league trains, in training order: the baseline first when a defense starts from it,
    then the defenses, then the surrogate."""
    needs_baseline = any(m in cfg.start_from_baseline for m in cfg.methods)
    first = ["baseline"] if needs_baseline or "baseline" in cfg.methods else []
    return [*first, *(m for m in cfg.methods if m not in first), SURROGATE]


def run_config(cfg: LeagueConfig, label: str, out_dir: Path) -> RunConfig:
    """The run config of one run of the league (a method, or SURROGATE), validated.

    Its base preset, without the preset's name and evaluation (the league evaluates), its
    epoch-counting keys scaled to the league's epochs; then what the league fixes; then
    `overrides.all` and the method's own overrides.
    """
    from phalanx.presets import resolve_config_path
    from phalanx.train.registry import build_method

    method = "baseline" if label == SURROGATE else label
    preset = cfg.preset(method)
    base = read_yaml_mapping(resolve_config_path(preset), "preset")
    trains = (base.get("train") or {}).get("method", "baseline")
    if trains != method:
        raise ConfigError(f"presets.{method} = {preset!r} is not allowed: it trains {trains!r}, not {method!r}")
    data = {k: v for k, v in base.items() if k not in ("name", "eval", "paper", "reproduce_from")}
    _scale_epochs(data, cfg.epochs, (base.get("train") or {}).get("epochs", RunConfig().train.epochs))
    seed = cfg.surrogate_seed if label == SURROGATE else cfg.seed
    league = {
        "name": f"{cfg.name}-{label}", "seed": seed, "device": cfg.device,
        "data": {"dataset": cfg.dataset, **to_mapping(cfg.data)},
        "model.arch": cfg.arch, "model.members": cfg.members,
        "train.method": method, "train.epochs": cfg.epochs,
        "train.init_from": str(out_dir / "baseline") if label in cfg.start_from_baseline else None,
    }
    if cfg.batch_size is not None:
        league["train.batch_size"] = cfg.batch_size
    for key, value in league.items():
        set_key(data, key, value, key)
    for key in (EVERY_RUN, method):
        for path, value in _leaf_items(cfg.overrides.get(key) or {}):
            set_key(data, path, value, f"overrides.{key}.{path}")
    try:
        run_cfg = from_mapping(RunConfig, data)
        build_method(run_cfg.train.method, run_cfg.method)  # the method's own parameters, before any training
    except ConfigError as exc:
        raise ConfigError(f"the {label} run of the league (preset {preset}): {exc}") from None
    return run_cfg


def _scale_epochs(data: dict[str, Any], epochs: int, preset_epochs: int) -> None:
    """Scale a preset's epoch-counting values (EPOCH_COUNTING_KEYS) by epochs / preset_epochs, so that
    a step schedule's milestones and TRS's delta ramp keep their place in a longer or shorter run."""
    if epochs == preset_epochs:
        return
    factor = epochs / preset_epochs

    def scaled(value: int) -> int:
        return max(1, int(value * factor + 0.5))  # half up: 41 of 120 epochs is 21 of 60

    for key in EPOCH_COUNTING_KEYS:
        section, name = key.split(".")
        node = data.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node[name]
        if isinstance(value, list):
            node[name] = sorted({scaled(v) for v in value})
        elif isinstance(value, int) and not isinstance(value, bool):
            node[name] = scaled(value)


def league_runs(cfg: LeagueConfig, out_dir: str | Path) -> dict[str, tuple[RunConfig, Path]]:
    """Every run of the league (`run_labels` order): its config and its directory under `out_dir`."""
    out_dir = Path(out_dir)
    return {label: (run_config(cfg, label, out_dir), out_dir / label) for label in run_labels(cfg)}


def check_league_dir(out_dir: Path, runs: Mapping[str, tuple[RunConfig, Path]]) -> None:
    """Refuse, before anything is written, an output folder that is a file or holds something other
    than a league's files, and a run directory holding a run of another configuration."""
    from phalanx.files import is_temp_name
    from phalanx.runs import RunDirError, check_run_dir

    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} is a file; --out must be a new or empty folder, or a league's folder")
    if out_dir.is_dir():
        allowed = {*ALL_METHODS, SURROGATE, *OUTPUT_FILES}
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in allowed and not any(is_temp_name(p.name, a) for a in OUTPUT_FILES))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RunDirError(f"{out_dir} is not a league's folder (it holds {shown}); --out must be a new or "
                              "empty folder, or a league's folder")
    for label, (run_cfg, run_dir) in runs.items():
        try:
            check_run_dir(run_dir, run_cfg)
        except RunDirError as exc:
            raise RunDirError(f"the league's {label} run: {exc} (a league reuses a run only when its "
                              "configuration is the same)") from None


# --- the league ----------------------------------------------------------------------------------

def whitebox_suites(cfg: LeagueConfig) -> list[SuiteConfig]:
    return [SuiteConfig(name, cfg.eps, models="mixture") for name in ("autoattack", "ensemble")]


def run_league(cfg: LeagueConfig, out_dir: str | Path, *, progress: bool = False,
               echo: Callable[[str], None] = lambda _: None, command: str = "") -> dict[str, Any]:
    """Train (or reuse) every run of the league in `out_dir`, evaluate each defense under the league's
    protocol, write `league.json`, `league.md` and `league.png` there; returns the league.json document.

    A run directory that already holds a run of the same configuration is reused (resumed if it
    stopped early; a complete one is not trained again). `echo` receives one line per step when
    `progress`; `command` is recorded with the transfer set.
    """
    from phalanx.checkpoint import latest_checkpoint
    from phalanx.eval.protocols import authors_transfer_attacks
    from phalanx.eval.run_eval import ALL_EXAMPLES, evaluate_run
    from phalanx.eval.transfer import craft_transfer_set, evaluate_transfer
    from phalanx.runs import checkpoint_dir
    from phalanx.device import resolve_device
    from phalanx.train.loop import train

    started = time.perf_counter()
    out_dir = Path(out_dir)
    resolve_device(cfg.device)
    runs = league_runs(cfg, out_dir)
    check_league_dir(out_dir, runs)
    say = echo if progress else (lambda _: None)
    for label, (run_cfg, run_dir) in runs.items():
        ckpt = latest_checkpoint(checkpoint_dir(run_dir))
        done = ckpt is not None and ckpt.meta.get("epoch") == run_cfg.train.epochs
        start = f" from {run_cfg.train.init_from}" if run_cfg.train.init_from else ""
        say(f"[{label}] {'reusing the trained run' if done else 'training'} {run_cfg.model.count} x "
            f"{run_cfg.model.label} with {run_cfg.train.method}{start} for {run_cfg.train.epochs} epochs on "
            f"{run_cfg.data.dataset} -> {run_dir}")
        train(run_cfg, run_dir, progress=progress)

    surrogate_cfg, surrogate_dir = runs[SURROGATE]
    transfer_attacks = authors_transfer_attacks([cfg.eps], resnet_surrogate=cfg.arch.startswith("resnet"))
    say(f"[{SURROGATE}] crafting the transfer examples ({', '.join(s.name.value for s in transfer_attacks)} "
        f"at eps {cfg.eps:g})")
    transfer_set = craft_transfer_set([surrogate_dir], transfer_attacks, examples=cfg.examples, seed=cfg.seed,
                                      first=True, out_path=out_dir / "transfer", device=cfg.device,
                                      command=command)
    defenses: dict[str, Any] = {}
    docs: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        run_cfg, run_dir = runs[method]
        say(f"[{method}] evaluating: AutoAttack and the ensemble suite at eps {cfg.eps:g}, then transfer")
        whitebox = evaluate_run(run_dir, attacks=(), suites=whitebox_suites(cfg),
                                examples=cfg.examples if cfg.examples is not None else ALL_EXAMPLES,
                                progress=progress)
        transfer = evaluate_transfer(run_dir, transfer_set, out_name="league-transfer.json")
        docs[method] = whitebox
        defenses[method] = _defense_entry(cfg, runs, method, whitebox, transfer)
    first = next(iter(docs.values()))
    doc = {
        "kind": "league", "name": cfg.name, "dataset": cfg.dataset, "dataset_display": first["dataset_display"],
        "arch": cfg.arch, "members": cfg.members, "epochs": cfg.epochs, "eps": cfg.eps,
        "config": to_mapping(cfg),
        "protocol": {
            "whitebox": {"examples": "the first n of the test split", "model": "mixture",
                         "suites": [to_mapping(s) for s in whitebox_suites(cfg)],
                         "worst_case": "per example, over every attack of both suites (`strongest`)"},
            "transfer": {"examples": "the same first n of the test split",
                         "attacks": [{"attack": s.name.value, "eps": s.eps, "params": s.resolved_params()}
                                     for s in transfer_attacks],
                         "surrogate_loss": "average of the surrogate members' losses",
                         "transfer_set": str(transfer_set),
                         "worst_case": "per example, over every transfer attack (`strongest`)"},
            "training_seconds": "sum of epoch_seconds in each run's metrics.jsonl; a run started from the "
                                "baseline adds the baseline's",
        },
        "surrogate": {"run": str(surrogate_dir), "method": surrogate_cfg.train.method,
                      "seed": surrogate_cfg.seed, "epochs": surrogate_cfg.train.epochs,
                      "training_seconds": training_seconds(surrogate_dir)},
        "defenses": defenses,
        "wall_time_s": time.perf_counter() - started,
    }
    write_league(doc, out_dir)
    return doc


def training_seconds(run_dir: str | Path) -> float:
    """The training time of a run: the sum of its epochs' `epoch_seconds` (metrics.jsonl)."""
    from phalanx.runs import read_metrics

    return float(sum(r.get("epoch_seconds", 0.0) for r in read_metrics(run_dir)))


def _defense_entry(cfg: LeagueConfig, runs: Mapping[str, tuple[RunConfig, Path]], method: str,
                   whitebox: dict[str, Any], transfer: dict[str, Any]) -> dict[str, Any]:
    from phalanx.quickstart import worst_case

    run_cfg, run_dir = runs[method]
    clean = next(r for r in whitebox["results"] if r["model"] == "mixture" and r["attack"] == "clean")
    seconds = training_seconds(run_dir)
    init = None
    if run_cfg.train.init_from:
        init_dir = runs["baseline"][1]
        init = {"run": str(init_dir), "epochs": runs["baseline"][0].train.epochs,
                "training_seconds": training_seconds(init_dir)}
    return {
        "method": method, "run": str(run_dir), "preset": cfg.preset(method), "epochs": run_cfg.train.epochs,
        "batch_size": run_cfg.train.batch_size, "activation": run_cfg.model.activation,
        "init_from": init,
        "clean": _summary(clean),
        "whitebox_worst_case": _summary(worst_case(whitebox, cfg.eps)),
        "transfer_worst_case": _summary(worst_case(transfer, cfg.eps)),
        "training_seconds": seconds,
        "training_seconds_total": seconds + (init["training_seconds"] if init else 0.0),
        "warnings": [*_violations(whitebox), *_violations(transfer)],
    }


def _summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """accuracy, n, ci95 (and the attacks of a worst case) of one evaluation record."""
    from phalanx.eval.stats import record_ci95

    if record is None:
        return None
    out = {"accuracy": record["accuracy"], "n": record["n"], "ci95": list(record_ci95(record) or (0.0, 1.0))}
    if "attacks" in (record.get("params") or {}):
        out["attacks"] = list(record["params"]["attacks"])
    return out


def _violations(doc: Mapping[str, Any]) -> list[str]:
    checks = (doc.get("sanity") or {}).get("checks") or {}
    return [f"{doc['kind']}: {message}" for check in checks.values() for message in check["violations"]]


# --- output --------------------------------------------------------------------------------------

def league_table(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per defense: epochs, training seconds, n, clean, white-box and transfer worst cases
    (each "accuracy ±95% margin", `tables.accuracy_cell`)."""
    from phalanx.eval.tables import accuracy_cell

    eps = doc["eps"]
    header = ["defense", "epochs", "training (s)", "n", "clean", f"white-box worst case {eps:g}",
              "n (transfer)", f"transfer worst case {eps:g}"]
    rows = []
    for method, entry in doc["defenses"].items():
        init = entry["init_from"]
        epochs = f"{entry['epochs']}" + (f" (+{init['epochs']} baseline)" if init else "")
        seconds = f"{entry['training_seconds_total']:.0f}" + (
            f" (incl. {init['training_seconds']:.0f} baseline)" if init else "")
        n, tn = entry["clean"]["n"], entry["transfer_worst_case"]["n"]
        rows.append([method, epochs, seconds, str(n), accuracy_cell(entry["clean"], n_shown=n),
                     accuracy_cell(entry["whitebox_worst_case"], n_shown=n), str(tn),
                     accuracy_cell(entry["transfer_worst_case"], n_shown=tn)])
    return header, rows


def league_title(doc: Mapping[str, Any]) -> str:
    return (f"League {doc['name']}: {doc['dataset_display']}, {doc['members']} x {doc['arch']}, "
            f"{doc['epochs']} epochs, eps {doc['eps']:g} (Linf); mixture accuracy (%) ±95% interval")


def league_points_figure(doc: Mapping[str, Any]) -> bytes:
    """The league's figure (PNG bytes): each defense's white-box worst case against its clean
    accuracy, with 95% intervals on both."""
    from phalanx.report.figures import LeaguePoint, league_figure

    points = [LeaguePoint(method, e["clean"]["accuracy"], e["whitebox_worst_case"]["accuracy"],
                          tuple(e["clean"]["ci95"]), tuple(e["whitebox_worst_case"]["ci95"]))
              for method, e in doc["defenses"].items()]
    n = next(iter(doc["defenses"].values()))["clean"]["n"]
    return league_figure(
        points, title=f"League {doc['name']}: {doc['dataset_display']}, {doc['members']} x {doc['arch']}, "
                      f"{doc['epochs']} epochs\nthe mixture's white-box worst case at eps {doc['eps']:g} "
                      f"(Linf) and clean accuracy, n = {n}, 95% intervals",
        robust_label=f"white-box worst case at eps {doc['eps']:g} (%)")


def write_league(doc: Mapping[str, Any], out_dir: Path) -> None:
    """league.json, league.png (robust against clean accuracy) and league.md in `out_dir`."""
    from phalanx.eval.tables import CI_NOTE, markdown_table
    from phalanx.files import write_json_atomic, write_text_atomic
    from phalanx.report.figures import save_png

    write_json_atomic(out_dir / "league.json", doc)
    save_png(out_dir / "league.png", league_points_figure(doc))
    protocol = doc["protocol"]
    transfer_names = ", ".join(f"{a['attack']} ({_params_text(a['params'])})"
                               for a in protocol["transfer"]["attacks"])
    surrogate = doc["surrogate"]
    notes = [
        "- clean and white-box: the mixture (average of the members' probabilities) on the first n test "
        "images. White-box worst case: an image counts as robust only if it survives every attack of "
        "AutoAttack's standard suite (APGD-CE, APGD-T, FAB-T, Square) and of the ensemble suite (APGD on the "
        f"mean logits with CE and DLR, on the members' summed CE, MORA), Linf eps {doc['eps']:g}.",
        "- transfer worst case: the same per-example worst case over the DVERGE authors' transfer attacks "
        f"{transfer_names}, crafted on the surrogate `{surrogate['run']}` (a separately trained "
        f"{surrogate['method']} ensemble, seed {surrogate['seed']}, {surrogate['epochs']} epochs; the attacks "
        "ascend its members' average loss) for the same n test images, and replayed on every defense.",
        f"- training (s): {protocol['training_seconds']}. DVERGE starts, as the DVERGE authors' code "
        "(`--start-from baseline`), from the league's baseline run when `start_from_baseline` names it.",
        f"- {CI_NOTE}.",
    ]
    warnings = [f"- {method}: {w}" for method, e in doc["defenses"].items() for w in e["warnings"]]
    runs = [f"- {method}: `{e['run']}` (base preset `{e['preset']}`, batch {e['batch_size']}, activation "
            f"{e['activation'] or 'the architecture default'})" for method, e in doc["defenses"].items()]
    figure = "![white-box worst case against clean accuracy, one point per defense](league.png)"
    lines = [f"# {league_title(doc)}", "", markdown_table(*league_table(doc)), "", figure, "", *notes, ""]
    if warnings:
        lines += ["Sanity warnings (gradient masking or a broken evaluation?):", "", *warnings, ""]
    lines += ["Runs:", "", *runs, ""]
    write_text_atomic(out_dir / "league.md", "\n".join(lines))


def _params_text(params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k in ("steps", "alpha", "restarts", "mu", "p", "gamma")}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


__all__ = ["ALL_METHODS", "DEFAULT_PRESETS", "LeagueConfig", "LeagueData", "check_league_dir", "league_runs",
           "league_table", "league_title", "load_league_config", "run_config", "run_league", "training_seconds"]
