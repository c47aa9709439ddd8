"""The main job: train ensembles on the embedded digits, evaluate them, print one comparison table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phalanx.config import load_config
from phalanx.eval.analysis import analyze_run
from phalanx.eval.run_eval import evaluate_run
from phalanx.eval.stats import record_ci95
from phalanx.eval.tables import CI_NOTE, accuracy_cell, accuracy_table, paired_eps_table, text_table
from phalanx.eval.transfer import GAL_TRANSFER_ATTACKS, craft_transfer_set, evaluate_transfer
from phalanx.report import write_report
from phalanx.presets import resolve_config_path
from phalanx.train.loop import train

# (label, preset, whether it starts from the baseline run's weights)
QUICKSTART_RUNS: tuple[tuple[str, str, bool], ...] = (
    ("baseline", "quickstart/baseline", False),
    ("dverge", "quickstart/dverge", True),
    ("gal", "quickstart/gal", False),
)

# Training is monitored on 144 held-out training digits (10% of 1,437), never on the test split, which
# is kept for the final tables (the presets alone validate on the test split, as their sources do).
HOLDOUT = "data.val_size=144"

# The eps of the headline: the quickstart presets run AutoAttack and the ensemble suite there.
HEADLINE_EPS = 0.1

# GAAS without the paper's k = 64: on the 16x16 digits it found ~0% and cost as much as k = 4, 16, 36
# together (see the GAAS curves of a quickstart report).
QUICKSTART_GAAS_KS = (4, 16, 36)


def comparison_rows(docs: dict[str, dict[str, Any]], table: Callable = accuracy_table
                    ) -> tuple[list[str], list[list[str]]]:
    """One table: each run's members and mixture, labelled by run."""
    header: list[str] = []
    rows: list[list[str]] = []
    for label, doc in docs.items():
        h, r = table(doc["results"])
        header = ["run", *h]
        rows += [[label, *row] for row in r]
    return header, rows


def headline_rows(docs: dict[str, dict[str, Any]], eps: float) -> tuple[list[str], list[list[str]]]:
    """Each mixture at `eps`: clean, the cheap PGD-Linf column, AutoAttack, the strongest ensemble
    objective and the worst case over every attack run (each with its 95% interval), and n."""
    header = ["run", "n", "clean", f"pgd-linf {eps:g} (cheap)", f"autoattack {eps:g}",
              f"ensemble suite {eps:g}", f"worst case {eps:g}"]
    rows = []
    for label, doc in docs.items():
        recs = [r for r in doc["results"] if r["model"] == "mixture"]
        at = {(r["attack"], r["eps"]): r for r in recs}
        ensemble = [r for r in recs if r["eps"] == eps and (r.get("params") or {}).get("suite") == "ensemble"]
        strongest_ensemble = min(ensemble, key=lambda r: r["accuracy"], default=None)
        cells = [at.get(("clean", 0.0)), at.get(("pgd-linf", eps)), at.get(("autoattack", eps)),
                 strongest_ensemble, worst_case(doc, eps)]
        rows.append([label, str(cells[0]["n"] if cells[0] else "—"),
                     *(accuracy_cell(c, n_shown=c["n"]) if c else "—" for c in cells)])
    return header, rows


def worst_case(doc: dict[str, Any], eps: float) -> dict[str, Any] | None:
    """The mixture's per-example worst case over every Linf attack run at `eps` (the "strongest" record)."""
    return next((r for r in doc["results"] if r["model"] == "mixture" and r["attack"] == "strongest"
                 and r["eps"] == eps), None)


def comparison_sentence(docs: dict[str, dict[str, Any]], eps: float, base: str = "baseline") -> str:
    """How each ensemble compares with the baseline under the worst case, with both intervals."""
    ref = worst_case(docs[base], eps) if base in docs else None
    if ref is None:
        return ""
    parts = []
    for label, doc in docs.items():
        rec = worst_case(doc, eps)
        if label == base or rec is None:
            continue
        diff = 100 * (rec["accuracy"] - ref["accuracy"])
        lo, hi = record_ci95(rec) or (0.0, 1.0)
        rlo, rhi = record_ci95(ref) or (0.0, 1.0)
        overlap = " (the 95% intervals overlap: not a significant difference)" if lo <= rhi and rlo <= hi else ""
        parts.append(f"{label} is {abs(diff):.1f} points {'more' if diff > 0 else 'less'} robust than {base}"
                     f"{overlap}")
    names = ", ".join(ref["params"]["attacks"])
    return (f"Worst case at eps {eps:g} (per example, over {names}): " + "; ".join(parts) + "."
            if parts else "")


def transfer_eps(docs: dict[str, dict[str, Any]]) -> list[str]:
    eps = sorted({r["eps"] for doc in docs.values() for r in doc["results"] if r["attack"] != "clean"})
    return [f"{e:g}" for e in eps]


def run_quickstart(out: Path, *, progress: bool = True, echo: Callable[[str], None] = print,
                   tensorboard: bool = False) -> Path:
    """Train every quickstart run into `out/<label>`, evaluate and analyze it (white-box accuracy, the GAL
    paper's gradient analyses), write `out/report.md`; returns its path.

    `tensorboard`: each run also logs its training metrics to `<run>/tensorboard`.
    """
    started = time.perf_counter()
    docs: dict[str, dict[str, Any]] = {}
    base_dir = out / "baseline"
    for label, preset, from_baseline in QUICKSTART_RUNS:
        overrides = [HOLDOUT, *([f"train.init_from={base_dir}"] if from_baseline else [])]
        cfg = load_config(resolve_config_path(preset), overrides)
        run_dir = out / label
        if progress:
            echo(f"[{label}] training {cfg.model.count} x {cfg.model.label} with {cfg.train.method} "
                 f"for {cfg.train.epochs} epochs on {cfg.data.dataset} -> {run_dir}")
        train(cfg, run_dir, progress=progress, tensorboard=tensorboard)
        if progress:
            echo(f"[{label}] evaluating (white-box)")
        docs[label] = evaluate_run(run_dir, progress=progress)
        if progress:
            echo(f"[{label}] gradient alignment and GAAS (GAL paper Figures 4-5)")
        analyze_run(run_dir, gaas_ks=QUICKSTART_GAAS_KS, progress=progress)
    surrogate = out / "surrogate"
    if progress:
        echo(f"[surrogate] training a separate baseline ensemble for black-box transfer -> {surrogate}")
    train(load_config(resolve_config_path("quickstart/surrogate"), [HOLDOUT]), surrogate, progress=progress,
          tensorboard=tensorboard)
    first_cfg = load_config(resolve_config_path(QUICKSTART_RUNS[0][1]))
    transfer_set = craft_transfer_set([surrogate], GAL_TRANSFER_ATTACKS[first_cfg.data.dataset], examples=None,
                                      seed=first_cfg.seed, out_path=out / "transfer", command="phalanx quickstart")
    transfer_docs = {label: evaluate_transfer(out / label, transfer_set) for label in docs}
    header, rows = comparison_rows(docs)
    first = next(iter(docs.values()))
    title = f"{first['dataset_display']}: white-box accuracy (%), {len(rows)} rows"
    echo("")
    echo(title)
    echo(CI_NOTE)
    echo(text_table(header, rows))
    echo(f"\nHeadline: each mixture at eps {HEADLINE_EPS:g}, accuracy (%) ±95% interval (Wilson); the worst case "
         "counts an example robust only if it survives every attack run on it")
    echo(text_table(*headline_rows(docs, HEADLINE_EPS)))
    sentence = comparison_sentence(docs, HEADLINE_EPS)
    if sentence:
        echo(sentence)
    echo(f"\nBlack-box transfer accuracy (%) from the surrogate ({surrogate}), eps {'/'.join(transfer_eps(transfer_docs))}")
    header, rows = comparison_rows(transfer_docs, table=paired_eps_table)
    echo(text_table(header, rows))
    _, html = write_report([out / label for label in docs], out, title="phalanx quickstart")
    echo(f"\ndone in {time.perf_counter() - started:.0f} s; report: {html}")
    echo(f"open it with: xdg-open {html}   (or read {out / 'report.md'})")
    return html
