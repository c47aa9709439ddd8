"""`phalanx reproduce NAME`: run the whole chain a seed table needs and print ours beside the paper's."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phalanx.config import RunConfig, load_config
from phalanx.errors import UsageError
from phalanx.eval.protocols import evaluate_report_protocol
from phalanx.eval.run_eval import evaluate_run
from phalanx.eval.transfer import craft_transfer_set, evaluate_transfer
from phalanx.eval.tables import accuracy_cell, accuracy_table, column_name, common_n, text_table
from phalanx.presets import resolve_config_path
from phalanx.report import write_report
from phalanx.train.loop import train


def preset_chain(name: str) -> list[str]:
    """The presets to run in order: each one's `reproduce_from` first."""
    chain = [name]
    while (parent := load_config(resolve_config_path(chain[0])).reproduce_from) is not None:
        if parent in chain:
            raise UsageError(f"preset {name!r} has a reproduce_from cycle through {parent!r}")
        chain.insert(0, parent)
    return chain


def scaled_epochs(epochs: int, scale: float) -> int:
    return max(1, math.ceil(epochs * scale))


def side_by_side(results: list[dict[str, Any]], paper: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of 'ours / paper' accuracy cells in % for the paper's columns, ours with its 95% margin
    (`tables.accuracy_cell`: is the paper's number inside our interval?) and each row's n."""
    ours: dict[tuple[str, str], dict[str, Any]] = {(r["model"], column_name(r)): r for r in results}
    columns = list(paper.get("columns", []))
    models = list(dict.fromkeys([r["model"] for r in results]))
    paper_rows = dict(paper.get("rows", {}))
    if len(paper_rows) == 1 and not set(paper_rows) & set(models):  # e.g. the GAL paper's "T_Div": the ensemble
        paper_rows = {"mixture": next(iter(paper_rows.values()))}
    rows = []
    for model in models:
        theirs = paper_rows.get(model)
        n = common_n([r for r in results if r["model"] == model])
        cells = []
        for i, col in enumerate(columns):
            mine = ours.get((model, col))
            cell = "—" if mine is None else accuracy_cell(mine, n_shown=n, digits=2)
            cells.append(f"{cell} / {theirs[i]:g}" if theirs is not None else f"{cell} / —")
        rows.append([model, "?" if n is None else str(n), *cells])
    return ["model (ours / paper)", "n", *columns], rows


def _train_preset(preset: str, out_root: Path, epochs_scale: float, overrides: list[str], progress: bool,
                  echo: Callable[[str], None], tensorboard: bool = False) -> tuple[RunConfig, Path]:
    """Train one preset of a chain into `out_root/<preset>` (resuming if it is there already)."""
    base = load_config(resolve_config_path(preset))
    cfg = load_config(resolve_config_path(preset),
                      [f"train.epochs={scaled_epochs(base.train.epochs, epochs_scale)}", *overrides])
    run_dir = out_root / preset
    echo(f"[{preset}] {cfg.train.method}: {cfg.model.count} x {cfg.model.label}, {cfg.train.epochs} epochs -> {run_dir}")
    train(cfg, run_dir, progress=progress, tensorboard=tensorboard)
    return cfg, run_dir


def reproduce(name: str, out_root: Path, *, epochs_scale: float = 1.0, data_dir: str | None = None,
              allow_noncanonical: bool = False, overrides: list[str] | None = None, progress: bool = True,
              echo: Callable[[str], None] = print, tensorboard: bool = False) -> Path:
    """Train every preset of `name`'s chain into `out_root/<preset>`, evaluate the last, report."""
    if not epochs_scale > 0:
        raise UsageError(f"--epochs-scale must be > 0, got {epochs_scale}")
    previous: Path | None = None
    cfg: RunConfig | None = None
    common = [f"data.root={data_dir}"] if data_dir is not None else []
    common += ["data.allow_noncanonical=true"] if allow_noncanonical else []
    common += list(overrides or [])
    for preset in preset_chain(name):
        init = [f"train.init_from={previous}"] if previous is not None else []
        cfg, previous = _train_preset(preset, out_root, epochs_scale, common + init, progress, echo, tensorboard)
    assert previous is not None and cfg is not None
    protocol = cfg.paper.get("protocol", "standard")
    if protocol == "dverge-report":  # the paper measured with its own script: compare under it
        standard = evaluate_run(previous, progress=progress)
        echo(f"\n{name} under the standard protocol, epoch {standard.get('epoch', '?')}")
        echo(text_table(*accuracy_table(standard["results"])))
        doc = evaluate_report_protocol(previous, progress=progress)
        kind = "white-box, report protocol"
    elif cfg.eval.transfer_from is None:
        doc = evaluate_run(previous, progress=progress)
        kind = "white-box"
    else:
        _, surrogate = _train_preset(cfg.eval.transfer_from, out_root, epochs_scale, common, progress, echo,
                                     tensorboard)
        echo(f"[{name}] crafting transfer examples on {surrogate} and evaluating {previous} on them")
        path = craft_transfer_set([surrogate], cfg.eval.attacks, examples=cfg.eval.examples, seed=cfg.seed,
                                  out_path=out_root / "transfer", batch_size=cfg.eval.batch_size,
                                  command=f"phalanx reproduce {name} --epochs-scale {epochs_scale:g}")
        doc = evaluate_transfer(previous, path, batch_size=cfg.eval.batch_size)
        kind = f"black-box transfer from {cfg.eval.transfer_from}"
    header, rows = side_by_side(doc["results"], dict(cfg.paper))
    echo(f"\n{name} ({kind}) on {doc.get('dataset_display', doc.get('dataset'))}, epoch {doc.get('epoch', '?')} — "
         f"{cfg.paper.get('source', 'no paper numbers')}")
    echo(text_table(header, rows))
    _, html = write_report([previous], previous, title=f"phalanx reproduce {name}")
    echo(f"\nreport: {html}")
    return html
