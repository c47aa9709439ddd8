"""Named evaluation protocols: each source's own way of measuring, so that numbers compare like with like.

- `standard` (the default): phalanx's evaluation, the run's `eval.attacks` and suites, attacks
  projected onto their threat model (run_eval.py).
- `dverge-report`: the DVERGE report's evaluation script (its test_project.py) as it runs, defects
  included: FGSM and its unprojected 5-step PGD (attacks/report_pgd.py) at eps 0.03, on the
  held-out first 1024 training images, clean accuracy counted on the last batch (of 256) of each
  pass and averaged over 10 reshuffled passes. Labelled "report protocol" wherever it is shown;
  never a default.
- `dverge-authors`: Yang et al. (2020)'s: white-box PGD-50 (step eps/5, 5 random restarts) over
  eps 0.01-0.07, and black-box transfer from a separately trained baseline ensemble with PGD,
  M-DI2-FGSM and, for ResNet surrogates, SGM, the per-example worst case at each eps.
- `gal-paper`: the GAL paper's transfer table (transfer.py).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phalanx.attacks import AttackName, AttackSpec, report_attacks
from phalanx.enums import coerce_enum
from phalanx.errors import UsageError
from phalanx.eval.measure import accuracy
from phalanx.eval.sanity import apply_sanity_checks, check_whitebox_below_transfer
from phalanx.eval.stats import add_ci95
from phalanx.eval.whitebox import attack_record, evaluate_whitebox, named_models
from phalanx.data.splits import SplitData
from phalanx.runs import open_run, write_eval_json


class Protocol(str, Enum):
    STANDARD = "standard"
    DVERGE_REPORT = "dverge-report"
    DVERGE_AUTHORS = "dverge-authors"
    GAL_PAPER = "gal-paper"


LABELS: dict[Protocol, str] = {
    Protocol.STANDARD: "standard",
    Protocol.DVERGE_REPORT: "report protocol",
    Protocol.DVERGE_AUTHORS: "DVERGE authors' protocol",
    Protocol.GAL_PAPER: "GAL paper's transfer protocol",
}


def coerce_protocol(name: Protocol | str) -> Protocol:
    return coerce_enum(Protocol, name, "protocol")


# --- the DVERGE report's evaluation script -------------------------------------------------------

REPORT_BATCH = 256  # the report's test_project.py: -b/--batch-size default 256 for the held-out loader
REPORT_PASSES = 10  # "averaged on 10 tests": the script's clean accuracy, 10 reshuffled passes


def last_batch_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = REPORT_BATCH,
                          passes: int = REPORT_PASSES, seed: int = 0) -> list[float]:
    """The script's clean accuracy: each pass reshuffles the held-out set and, because its counters
    are reset inside the batch loop, counts only the last batch; one value per pass."""
    n = len(y)
    last = last_batch_size(n, batch_size)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(passes):
        idx = torch.randperm(n, generator=gen)[n - last:].to(x.device)
        values.append(accuracy(model, x[idx], y[idx], batch_size))
    return values


def last_batch_size(n: int, batch_size: int = REPORT_BATCH) -> int:
    """How many of `n` examples a pass's last batch of `batch_size` holds."""
    return n - ((n - 1) // batch_size) * batch_size


def heldout_split(run_dir: str | Path) -> SplitData:
    """The split of a run's training data, whose hold-out (data.val_size, uint8 `val_x`, `val_y`)
    the report's script measures on; `copy` names a non-canonical copy of the dataset."""
    from phalanx.data.splits import load_training_data
    from phalanx.runs import read_run_config

    cfg = read_run_config(run_dir)
    if cfg.data.val_size == 0:
        raise UsageError(f"the dverge-report protocol measures on a held-out part of the training split, and "
                         f"{run_dir} trained on all of it (data.val_size = 0); train with data.val_size=1024 "
                         "data.val_from=head (the report's split) or evaluate with --protocol standard")
    return load_training_data(cfg.data, cfg.seed)


def evaluate_report_protocol(run_dir: str | Path, *, device: str | None = None, progress: bool = False,
                             batch_size: int = 500) -> dict[str, Any]:
    """The DVERGE report's evaluation of a run's members and mixture; writes `eval/dverge-report.json`.

    Attack accuracies count every held-out example (the script's attack loops accumulate over all
    batches); the attacks are deterministic, so `batch_size` changes only the speed.
    """
    from phalanx.data import display_name

    started = time.perf_counter()
    split = heldout_split(run_dir)
    run = open_run(run_dir, device)
    cfg, dev, mixture = run.cfg, run.device, run.mixture()
    x, y = split.val_x.to(dev).float().div_(255), split.val_y.to(dev)
    records: list[dict[str, Any]] = []
    for name, model in named_models(mixture):
        t0 = time.perf_counter()
        values = last_batch_accuracies(model, x, y, seed=cfg.seed)
        records.append({"model": name, "attack": "clean", "eps": 0.0, "accuracy": sum(values) / len(values),
                        "accuracy_std": float(torch.tensor(values).std()), "n": len(values) * last_batch_size(len(y)),
                        "repeats": len(values), "params": {"counted_on": "last batch of each pass",
                                                           "batch_size": REPORT_BATCH, "passes": REPORT_PASSES},
                        "source": "white-box", "seed": cfg.seed, "wall_time_s": time.perf_counter() - t0,
                        # clean accuracy on every attacked example, for the sanity checks and for reference
                        "accuracy_attacked": accuracy(model, x, y, batch_size)})
        for spec in report_attacks(scripted=True):
            record, _ = attack_record(name, model, spec, x, y, seed=cfg.seed, batch_size=batch_size,
                                      progress=f"{name} {spec.name.value}" if progress else None)
            records.append(record)
    for record in records:
        record["protocol"] = Protocol.DVERGE_REPORT.value
    add_ci95(records)
    sanity = apply_sanity_checks(records)
    doc = {"kind": "protocol", "protocol": Protocol.DVERGE_REPORT.value, "label": LABELS[Protocol.DVERGE_REPORT],
           "run": str(run.run_dir), "dataset": cfg.data.dataset,
           "dataset_display": display_name(cfg.data.dataset, cfg.data.root, split.copy),
           "method": cfg.train.method, "arch": cfg.model.label, "epoch": run.epoch,
           "split": f"held-out training images ({len(y)}, data.val_from={cfg.data.val_from})",
           "device": str(dev), "command": _command(), "wall_time_s": time.perf_counter() - started,
           "results": records, "sanity": sanity}
    write_eval_json(run.run_dir, "dverge-report.json", doc)
    return doc


# --- the DVERGE authors' evaluation --------------------------------------------------------------

AUTHORS_EPS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)  # DVERGE paper, Figure 3 / section 5.1
AUTHORS_WHITEBOX_STEPS = 50  # DVERGE paper, section 5.1: PGD with 50 steps of eps/5, 5 random restarts
AUTHORS_WHITEBOX_RESTARTS = 5


def authors_whitebox_attacks(eps_grid: Sequence[float] = AUTHORS_EPS) -> tuple[AttackSpec, ...]:
    return tuple(AttackSpec(AttackName.PGD_LINF, e, {"alpha": e / 5, "steps": AUTHORS_WHITEBOX_STEPS,
                                                      "restarts": AUTHORS_WHITEBOX_RESTARTS,
                                                      "random_start": True})
                 for e in eps_grid)


AUTHORS_TRANSFER_STEPS = 100  # DVERGE authors' scripts/evaluation.sh --steps 100 (the transfer sets' names)


def authors_transfer_attacks(eps_grid: Sequence[float], *, resnet_surrogate: bool) -> tuple[AttackSpec, ...]:
    """At each eps: PGD (100 steps of eps/5, random start), M-DI2-FGSM and, for a ResNet surrogate,
    SGM (registry defaults: the authors' where published, see registry.py)."""
    out: list[AttackSpec] = []
    for e in eps_grid:
        out.append(AttackSpec(AttackName.PGD_LINF, e, {"alpha": e / 5, "steps": AUTHORS_TRANSFER_STEPS}))
        out.append(AttackSpec(AttackName.M_DI2_FGSM, e))
        if resnet_surrogate:
            out.append(AttackSpec(AttackName.SGM, e))
    return tuple(out)


def evaluate_authors_protocol(run_dir: str | Path, surrogate_run_dir: str | Path, *, examples: int | None = None,
                              eps_grid: Sequence[float] = AUTHORS_EPS, device: str | None = None,
                              transfer_dir: str | Path | None = None, seed: int = 0,
                              progress: bool = False) -> dict[str, Any]:
    """White-box and black-box accuracy of a run's mixture over `eps_grid`; writes `eval/dverge-authors.json`.

    The surrogate is the mixture of `surrogate_run_dir`'s members (a separately trained baseline
    ensemble of the same architecture); its transfer set is crafted once and reused (transfer.py).
    """
    from phalanx.eval.run_eval import resolve_examples
    from phalanx.eval.transfer import craft_transfer_set, evaluate_transfer
    from phalanx.runs import read_run_config

    started = time.perf_counter()
    run_dir, surrogate_run_dir = Path(run_dir), Path(surrogate_run_dir)
    if run_dir.resolve() == surrogate_run_dir.resolve():
        raise UsageError("the surrogate must be a separately trained ensemble, not the evaluated run itself")
    cfg = read_run_config(run_dir)
    n = resolve_examples(examples, cfg.eval.examples)
    surrogate_model = read_run_config(surrogate_run_dir).model
    surrogate_arch = surrogate_model.label
    # SGM needs skip connections: every member a ResNet
    resnets = all((m.arch or "").startswith("resnet") for m in surrogate_model.member_specs())
    specs = authors_transfer_attacks(eps_grid, resnet_surrogate=resnets)
    path = craft_transfer_set([surrogate_run_dir], specs, examples=n, seed=seed,
                              out_path=Path(transfer_dir or surrogate_run_dir / "transfer"),
                              batch_size=cfg.eval.batch_size, device=device, command=_command(),
                              surrogate_loss="mixture")
    transfer = evaluate_transfer(run_dir, path, device=device, batch_size=cfg.eval.batch_size, out_name=None)
    run = open_run(run_dir, device)
    cfg, dev = run.cfg, run.device
    x, y = run.test_images()
    whitebox = evaluate_whitebox(run.mixture(), x, y, authors_whitebox_attacks(eps_grid),
                                 examples=n, seed=cfg.seed, batch_size=cfg.eval.batch_size, progress=progress,
                                 models="mixture")
    for record in whitebox + transfer["results"]:
        record["protocol"] = Protocol.DVERGE_AUTHORS.value
    doc = {"kind": "protocol", "protocol": Protocol.DVERGE_AUTHORS.value, "label": LABELS[Protocol.DVERGE_AUTHORS],
           "run": str(run_dir), "dataset": cfg.data.dataset, "dataset_display": run.dataset_display(),
           "method": cfg.train.method, "arch": cfg.model.label, "epoch": run.epoch,
           "surrogate_run": str(surrogate_run_dir), "surrogate_arch": surrogate_arch, "eps": list(eps_grid),
           "transfer_set": str(path), "device": str(dev), "command": _command(),
           "wall_time_s": time.perf_counter() - started, "results": whitebox + transfer["results"],
           "sanity": {"white-box": apply_sanity_checks(whitebox),
                      "transfer": apply_sanity_checks(transfer["results"], white_box=False,
                                                      extra=check_whitebox_below_transfer(whitebox,
                                                                                          transfer["results"]))},
           "curve": transferability_curve(whitebox, transfer["results"])}
    write_eval_json(run_dir, "dverge-authors.json", doc)
    return doc


def transferability_curve(whitebox: Sequence[dict[str, Any]], transfer: Sequence[dict[str, Any]]
                          ) -> list[dict[str, Any]]:
    """Per eps, the mixture's white-box accuracy, its accuracy under each transfer attack and under
    their per-example worst case ("strongest"): the data of the DVERGE paper's Figure 3."""
    rows: dict[float, dict[str, Any]] = {}
    for rec in whitebox:
        if rec["model"] == "mixture" and rec["attack"] == "pgd-linf" and rec["eps"] > 0:
            rows.setdefault(rec["eps"], {"eps": rec["eps"]})["whitebox"] = rec["accuracy"]
    for rec in transfer:
        if rec["model"] == "mixture" and rec["eps"] > 0:
            key = "transfer" if rec["attack"] == "strongest" else rec["attack"]
            rows.setdefault(rec["eps"], {"eps": rec["eps"]})[key] = rec["accuracy"]
    return [rows[e] for e in sorted(rows)]


def _command() -> str:
    return shlex.join(["phalanx", *sys.argv[1:]]) if Path(sys.argv[0]).name == "phalanx" else ""
