"""The run report: Markdown and self-contained HTML made from run directories' files alone.

Reads `config.yaml`, `metrics.jsonl`, `eval/*.json` and `analysis/gradients.json` (never a
checkpoint), builds the DVERGE model-mixture report's material (loss curves as its Figures 2-4,
accuracy tables in the layout of its Tables 1-3) plus robustness curves, transferability heatmaps,
the GAL paper's gradient analyses (coherence histograms as its Figure 4, GAAS curves as its
Figure 5; written by `phalanx analyze`) and a side-by-side comparison of the runs' mixtures with
their coherence histograms overlaid. A missing or unreadable file skips what needs it and the
report says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from phalanx.config import ConfigError, ModelConfig, from_mapping
from phalanx.errors import UsageError
from phalanx.eval.stats import record_ci95, record_n
from phalanx.eval.tables import common_n
from phalanx.files import write_text_atomic
from phalanx.report import figures
from phalanx.report.figures import Curve, Panel, eps_label
from phalanx.report.markup import Block, Heading, Image, Table, Text, to_html, to_markdown
from phalanx.report.run_data import PROTOCOL_LABELS, WHITE_BOX, RunData, is_number, read_run_data

WARN = "⚠"
LOSS_CAPTION = ("Training loss of each member (left), validation loss (middle) and accuracy (right) of each "
                "member and of the mixture, against epochs.")
GRADIENT_HEADING = "Gradient alignment (GAL paper)"
COHERENCE_TEXT = ("Coherence is the largest cosine similarity between two members' gradients (GAL paper "
                  "eq. 7): near 1, one perturbation fools the members together; near 0 or below, their weak "
                  "spots differ.")
COHERENCE_CAPTION = ("Coherence per test example (GAL paper Figure 4): % of examples per bin of width 0.05 "
                     "on [-1, 1].")
GAAS_CAPTION = ("GAAS (GAL paper Figure 5): probability that all k orthogonal L∞ directions aligned with the "
                "mixture's input gradient are adversarial, against k, one line per ε.")
CURVES_CAPTION = ("Accuracy against ε for each attack evaluated at several ε (ε = 0 is clean accuracy): the "
                  "mixture as the thick line, members thin and grey.")


# ---------------------------------------------------------------- tables


Column = tuple[str, float]  # (attack, eps); clean is ("clean", 0.0)


def column_label(col: Column) -> str:
    attack, eps = col
    if attack == "clean":
        return "clean"
    # L2 radii are quoted as plain numbers in the papers (e.g. 0.5), L-inf ones in grey levels.
    return f"{attack} {eps:g}" if attack.endswith("l2") else f"{attack} {_eps_text(eps)}"


def _eps_text(eps: float) -> str:
    """'8/255' when eps is a whole number of grey levels, else the plain value (e.g. 0.03)."""
    label = eps_label(eps)
    return label if "." not in label else f"{eps:g}"


def _model_key(model: str, first_seen: int) -> tuple[int, int]:
    m = re.fullmatch(r"member(\d+)", model)
    if m:
        return (0, int(m.group(1)))
    return (1, 0) if model == "mixture" else (2, first_seen)


def _columns(records: Sequence[Mapping[str, Any]]) -> list[Column]:
    cols: list[Column] = []
    for rec in records:
        col = (rec["attack"], rec["eps"])
        if col not in cols:
            cols.append(col)
    return sorted(cols, key=lambda c: c[0] != "clean")  # stable: clean first, then as measured


def _cell(rec: Mapping[str, Any], n_shown: int | None) -> str:
    """"61.76 (58.7–64.7)": accuracy and its 95% Wilson interval in %; a clean accuracy averaged over
    random subsets adds its spread, "61.76 ± 0.40 (58.7–64.7)"; an n other than the table's
    `n_shown` goes inside the parentheses, "(58.7–64.7, n=64)". Records written before `ci95` existed
    get it computed from their accuracy and n."""
    text = f"{100 * rec['accuracy']:.2f}"
    std = rec.get("accuracy_std")
    if is_number(std) and (rec.get("repeats", 1) > 1 if is_number(rec.get("repeats")) else std > 0):
        text += f" ± {100 * std:.2f}"
    ci, n = record_ci95(rec), record_n(rec)
    inside = [] if ci is None else [f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"]
    if n != n_shown or ci is None:
        inside.append(f"n={n}" if n is not None else "n unknown")
    return f"{text} ({', '.join(inside)})"


def _n_text(records: Sequence[Mapping[str, Any]]) -> str:
    """What a table's caption says about n and the intervals of its cells (see `_cell`)."""
    n = common_n(records)
    if n is None:
        return "n unknown: no confidence interval"
    differs = any(record_n(r) != n for r in records)
    return (f"n = {n} test examples per cell" + (" unless the cell gives its own n" if differs else "")
            + "; in parentheses the 95% Wilson confidence interval")


class Footnotes:
    """Numbered warning markers for table cells, one footnote per distinct warning."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._numbers: dict[str, int] = {}

    def marks(self, warnings: Sequence[str]) -> str:
        """" ⚠1,2" for a cell with these warnings ("" for none); new warnings get the next numbers."""
        numbers = []
        for warning in warnings:
            if warning not in self._numbers:
                self._numbers[warning] = len(self._numbers) + 1
                self.lines.append(f"{WARN}{self._numbers[warning]} {warning}")
            numbers.append(str(self._numbers[warning]))
        return f" {WARN}{','.join(numbers)}" if numbers else ""


def accuracy_table(records: Sequence[Mapping[str, Any]], caption: str) -> Table:
    """Member rows then the mixture row; clean then each (attack, eps); accuracy and its 95%
    interval in % (`_cell`); the caption says n (`_n_text`).

    A record's warnings put a numbered marker next to its number and a footnote under the table.
    """
    cols = _columns(records)
    n_shown = common_n(records)
    cells: dict[str, dict[Column, str]] = {}
    order: dict[str, int] = {}
    notes = Footnotes()
    for rec in records:
        col = (rec["attack"], rec["eps"])
        order.setdefault(rec["model"], len(order))
        cells.setdefault(rec["model"], {})[col] = _cell(rec, n_shown) + notes.marks(rec.get("warnings", []))
    models = sorted(cells, key=lambda m: _model_key(m, order[m]))
    rows = [[m, *(cells[m].get(c, "—") for c in cols)] for m in models]
    return Table(["model", *map(column_label, cols)], rows, caption, notes.lines)


def _params_text(records: Sequence[Mapping[str, Any]]) -> str:
    """Each attack's parameters once, e.g. 'pgd-linf: alpha 0.007, steps 10'."""
    seen: dict[str, str] = {}
    for rec in records:
        params = rec.get("params")
        if rec["attack"] == "clean" or rec["attack"] in seen or not isinstance(params, dict):
            continue
        shown = [f"{k} {v:g}" if is_number(v) and not isinstance(v, int) else f"{k} {v}"
                 for k, v in params.items() if k not in ("name", "eps") and v is not None]
        if shown:
            seen[rec["attack"]] = f"{rec['attack']}: " + ", ".join(shown)
    return "; ".join(seen.values())


def _group_by_source(evals: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for _, doc in evals:
        for rec in doc["results"]:
            groups.setdefault(rec["source"], []).append(rec)
    return groups


def _source_title(source: str) -> str:
    if source.endswith(", report protocol"):
        return ("White-box accuracy (%) under the report protocol: the DVERGE report's own script (unprojected "
                "5-step PGD, clean accuracy on the last batch of each pass, held-out training images); "
                "not comparable with the standard tables")
    if source == WHITE_BOX:
        return "White-box accuracy (%)"
    if source.startswith("transfer:"):
        return f"Transfer accuracy (%): adversarial examples crafted on {source.split(':', 1)[1]}"
    return f"Accuracy (%), source {source}"


def _eval_caption(records: Sequence[Mapping[str, Any]], doc_epoch: Any) -> str:
    parts = []
    if is_number(doc_epoch):
        parts.append(f"checkpoint of epoch {doc_epoch:g}")
    parts.append(_n_text(records))
    repeats = {r.get("repeats") for r in records if r["attack"] == "clean" and is_number(r.get("repeats"))}
    if any(r > 1 for r in repeats):
        parts.append(f"clean accuracy averaged over {max(repeats):g} random subsets (mean ± std; its "
                     "interval is that of one subset's n)")
    seeds = sorted({r["seed"] for r in records if is_number(r.get("seed"))})
    if seeds:
        parts.append("seed " + ", ".join(f"{s:g}" for s in seeds))
    params = _params_text(records)
    if params:
        parts.append(params)
    return "; ".join(parts)


def paper_table(cfg: Mapping[str, Any]) -> Table | None:
    """The numbers a preset reproduces (config `paper`), for reading next to the measured table."""
    paper = cfg.get("paper")
    if not isinstance(paper, dict):
        return None
    cols, rows = paper.get("columns"), paper.get("rows")
    if not (isinstance(cols, list) and isinstance(rows, dict) and rows):
        return None
    body = [[str(model), *(str(v) for v in (values if isinstance(values, list) else [values]))]
            for model, values in rows.items()]
    width = len(cols) + 1
    body = [r[:width] + ["—"] * (width - len(r)) for r in body]
    caption = f"Reported: {paper.get('source', 'paper')}"
    protocol = paper.get("protocol")
    if isinstance(protocol, str) and protocol != "standard":
        caption += (f"; measured by the source's own protocol, so compare with the table under the "
                    f"{PROTOCOL_LABELS.get(protocol, protocol)}, not with the standard one")
    return Table(["model", *map(str, cols)], body, caption)


# ---------------------------------------------------------------- figures from run data


def _val_label(metrics: Sequence[Mapping[str, Any]]) -> str:
    source = next((m["val_source"] for m in reversed(metrics) if isinstance(m.get("val_source"), str)), None)
    return {"test": "validation (test split)", "train-holdout": "validation (held-out training data)"}.get(
        source, "validation")


def _square_matrix(obj: Any) -> list[list[float]] | None:
    if not (isinstance(obj, list) and obj and all(isinstance(r, list) and len(r) == len(obj) for r in obj)):
        return None
    return [[float(v) if is_number(v) else math.nan for v in row] for row in obj]


def _last_diagnostic(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[Any, list[list[float]]] | None:
    for row in reversed(metrics):
        diag = row.get("diagnostics")
        if isinstance(diag, dict):
            matrix = _square_matrix(diag.get(key))
            if matrix is not None:
                return row["epoch"], matrix
    return None


def _curve_panels(records: Sequence[Mapping[str, Any]], *, models: str = "all", label: str | None = None
                  ) -> dict[str, Panel]:
    """Per attack with two or more epsilons: accuracy vs eps of each model (clean at eps 0)."""
    clean = {r["model"]: r["accuracy"] for r in records if r["attack"] == "clean"}
    by_attack: dict[str, dict[str, dict[float, float]]] = {}
    for rec in records:
        if rec["attack"] != "clean":
            by_attack.setdefault(rec["attack"], {}).setdefault(rec["model"], {})[rec["eps"]] = rec["accuracy"]
    panels = {}
    for attack, per_model in by_attack.items():
        if len({e for pts in per_model.values() for e in pts}) < 2:
            continue
        names = sorted(per_model, key=lambda m: _model_key(m, 0))
        if models == "mixture":
            names = [m for m in names if m == "mixture"]
        curves = []
        for model in names:
            pts = dict(per_model[model])
            if model in clean:
                pts.setdefault(0.0, clean[model])
            curves.append(Curve(label or model, list(pts), list(pts.values()), emphasis=model == "mixture"))
        if curves:
            panels[attack] = Panel(attack, curves)
    return panels


# ---------------------------------------------------------------- report assembly


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _unique_slugs(runs: Sequence[RunData]) -> list[str]:
    slugs: list[str] = []
    for run in runs:
        base = slug = _slug(run.name)
        k = 2
        while slug in slugs or slug == "comparison":
            slug, k = f"{base}-{k}", k + 1
        slugs.append(slug)
    return slugs


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _model_label(cfg: Mapping[str, Any]) -> Any:
    """The architecture as `ModelConfig.label` says it (a user factory, or 'conv+resnet20' when
    mixed); the stored value when the section does not read as a ModelConfig."""
    try:
        return from_mapping(ModelConfig, _get(cfg, "model")).label
    except ConfigError:
        return _get(cfg, "model.arch")


def _member_count(cfg: Mapping[str, Any]) -> Any:
    members = _get(cfg, "model.members")
    return len(members) if isinstance(members, list) else members


def _run_overview(run: RunData) -> Table:
    cfg = run.config
    wb = next((doc for _, doc in run.evals if doc.get("kind") == WHITE_BOX), None)
    rows = [
        ("run directory", str(run.path)),
        ("dataset", (wb or {}).get("dataset_display") or _get(cfg, "data.dataset")),
        ("architecture", _model_label(cfg) or (wb or {}).get("arch")),
        ("members", _member_count(cfg)),
        ("method", _get(cfg, "train.method") or (wb or {}).get("method")),
        ("epochs (configured)", _get(cfg, "train.epochs")),
        ("epochs (logged)", run.metrics[-1]["epoch"] if run.metrics else None),
        ("optimizer", " ".join(f"{k} {_get(cfg, 'optim.' + k)}" for k in ("name", "lr", "momentum")
                               if _get(cfg, "optim." + k) is not None) or None),
        ("batch size", _get(cfg, "train.batch_size")),
        ("seed", cfg.get("seed")),
    ]
    return Table(["setting", "value"], [[k, str(v)] for k, v in rows if v not in (None, "")], bold_row=None)


def _training_text(run: RunData) -> str:
    last = run.metrics[-1]
    parts = [f"{len(run.metrics)} epoch(s) logged, last epoch {last['epoch']:g}"]
    seconds = [m["epoch_seconds"] for m in run.metrics if is_number(m.get("epoch_seconds"))]
    if seconds:
        parts.append(f"training time {sum(seconds):.1f} s ({sum(seconds) / len(seconds):.1f} s/epoch)")
    if is_number(last.get("val_mixture_acc")):
        parts.append(f"last {_val_label(run.metrics)} accuracy: mixture {100 * last['val_mixture_acc']:.2f}%")
        if isinstance(last.get("val_member_acc"), list):
            members = ", ".join(f"{100 * a:.2f}%" for a in last["val_member_acc"] if is_number(a))
            parts[-1] += f", members {members}"
    layers = [str(m["layer"]) for m in run.metrics if "layer" in m]
    if layers:
        if len(layers) <= 30:
            parts.append("layer drawn per epoch (DVERGE): " + ", ".join(layers))
        else:
            counts = {layer: layers.count(layer) for layer in dict.fromkeys(layers)}
            parts.append("layers drawn (DVERGE), epochs each: "
                         + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "; ".join(parts) + "."


def _run_blocks(run: RunData, slug: str) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Run: {run.name}"), _run_overview(run)]
    blocks += [Text(f"Missing: {m}.", missing=True) for m in run.missing]

    blocks.append(Heading(3, "Training"))
    if run.metrics:
        blocks.append(Text(_training_text(run)))
        png = figures.loss_figure(run.metrics, title=f"{run.name}: losses and accuracy per epoch",
                                  val_label=_val_label(run.metrics))
        blocks.append(Image(f"figures/{slug}-loss.png", png, LOSS_CAPTION))
    else:
        blocks.append(Text("No training metrics: loss curves skipped.", missing=True))

    blocks.append(Heading(3, "Robustness"))
    groups = _group_by_source(run.evals)
    if not groups:
        blocks.append(Text("No evaluation results: accuracy tables and robustness curves skipped.",
                           missing=True))
    epochs = {rec["source"]: doc.get("epoch") for _, doc in run.evals for rec in doc["results"]}
    curve_panels: list[Panel] = []
    for source, records in groups.items():
        blocks.append(Heading(4, _source_title(source)))
        blocks.append(accuracy_table(records, _eval_caption(records, epochs.get(source))))
        for attack, panel in _curve_panels(records).items():
            title = attack if source == WHITE_BOX else f"{attack} ({source})"
            curve_panels.append(Panel(title, panel.curves))
    paper = paper_table(run.config)
    if paper is not None:
        blocks += [Heading(4, "Reported numbers this run reproduces"), paper]
    if curve_panels:
        png = figures.robustness_figure(curve_panels, title=f"{run.name}: accuracy against attack strength")
        blocks.append(Image(f"figures/{slug}-robustness.png", png, CURVES_CAPTION))
    elif groups:
        blocks.append(Text("Robustness curves skipped: no attack was evaluated at more than one ε.",
                           missing=True))

    blocks.append(Heading(3, "Transferability within the ensemble"))
    found = _last_diagnostic(run.metrics, "transferability")
    if found is None:
        blocks.append(Text("No `diagnostics.transferability` in metrics.jsonl: heatmap skipped.",
                           missing=True))
    else:
        epoch, matrix = found
        png = figures.heatmap_figure(
            matrix, title=f"{run.name}: transferability, epoch {epoch:g}\n"
                          "accuracy of target on examples crafted on source",
            colorbar_label="accuracy of target member (%)")
        blocks.append(Image(f"figures/{slug}-transferability.png", png,
                            f"Entry (i, j): accuracy (%) of member j on adversarial examples crafted on "
                            f"member i, epoch {epoch:g}. High off-diagonal values: attacks do not transfer."))
    found = _last_diagnostic(run.metrics, "vulnerability_diversity")
    if found is not None:
        epoch, matrix = found
        png = figures.heatmap_figure(matrix, title=f"{run.name}: vulnerability diversity, epoch {epoch:g}",
                                     colorbar_label="vulnerability diversity", percent=False,
                                     xlabel="member j", ylabel="member i")
        blocks.append(Image(f"figures/{slug}-vulnerability-diversity.png", png,
                            f"Vulnerability diversity between members i and j, epoch {epoch:g}."))
    return blocks + _gradient_blocks(run, slug)


def _gradient_blocks(run: RunData, slug: str) -> list[Block]:
    """GAL paper Figures 4 and 5 for one run, with their numbers, from `analysis/gradients.json`."""
    blocks: list[Block] = [Heading(3, GRADIENT_HEADING)]
    doc = run.analysis
    if doc is None:
        return blocks + [Text("No usable analysis/gradients.json: coherence histogram and GAAS curves "
                              "skipped (run `phalanx analyze` on this run directory).", missing=True)]
    about = [f"checkpoint of epoch {doc['epoch']:g}"] if is_number(doc.get("epoch")) else []
    if is_number(doc.get("members")):
        about.append(f"{doc['members']:g} members")
    first = f"first {doc['n']:g} " if is_number(doc.get("n")) else "first "
    blocks.append(Text(f"Input gradients of the members' cross-entropy on the {first}test examples"
                       + (f" ({', '.join(about)})" if about else "") + ". " + COHERENCE_TEXT))
    notes = doc.get("notes")
    if isinstance(notes, list) and notes:
        blocks.append(Text("Notes from `phalanx analyze`: " + "; ".join(map(str, notes)) + "."))
    coh = doc["coherence"]
    if coh is not None:
        png = figures.coherence_histogram_figure([(run.name, coh)],
                                                 title=f"{run.name}: coherence per test example")
        blocks.append(Image(f"figures/{slug}-coherence.png", png, COHERENCE_CAPTION))
        blocks.append(_coherence_table(doc))
    else:
        blocks.append(Text("Coherence histogram skipped: no usable coherence list.", missing=True))
    gaas = doc["gaas"]
    if gaas is not None:
        png = figures.gaas_figure(gaas["results"], title=f"{run.name}: GAAS of the mixture")
        n = gaas.get("n")
        blocks.append(Image(f"figures/{slug}-gaas.png", png, GAAS_CAPTION + (
            f" Over the {n:g} examples the mixture classifies correctly." if is_number(n) else "")))
        blocks.append(_gaas_table(gaas["results"]))
    else:
        blocks.append(Text("GAAS skipped: no GAAS results in analysis/gradients.json.", missing=True))
    return blocks


def _coherence_table(doc: Mapping[str, Any]) -> Table:
    """Mean/median coherence, the strongly aligned fraction, mean GAL and each pair's mean cosine."""
    coh = doc["coherence"]
    summary = doc.get("coherence_summary") if isinstance(doc.get("coherence_summary"), dict) else {}
    rows = [["examples", f"{len(coh)}"], ["mean coherence", _num(summary.get("mean"))],
            ["median coherence", _num(summary.get("median"))],
            ["examples with coherence > 0.5 (%)", _num(summary.get("fraction_above_0.5"), percent=True)]]
    gal = doc.get("gal")
    if isinstance(gal, list) and gal and all(map(is_number, gal)):
        rows.append(["mean GAL (eq. 8)", _num(sum(gal) / len(gal))])
    pairs, cosines = doc.get("pairs"), doc.get("mean_cosine_per_pair")
    if isinstance(pairs, list) and isinstance(cosines, list) and len(pairs) == len(cosines):
        for pair, cos in zip(pairs, cosines):
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, int) for i in pair):
                rows.append([f"mean cosine, members {pair[0] + 1} and {pair[1] + 1}", _num(cos)])
    return Table(["statistic", "value"], rows, "Coherence: max pairwise cosine of the members' input "
                 "gradients per example (GAL paper eq. 7); GAL: its smooth maximum (eq. 8).", bold_row=None)


def _gaas_table(results: Sequence[Mapping[str, Any]]) -> Table:
    """P(all k directions adversarial) in %, one row per k, one column per eps."""
    eps_values = sorted({float(r["eps"]) for r in results})
    cells = {(int(r["k"]), float(r["eps"])): f"{100 * r['p_all']:.1f}" for r in results}
    ks = sorted({k for k, _ in cells})
    return Table(["k", *(f"ε = {e:g} ({eps_label(e)})" for e in eps_values)],
                 [[str(k), *(cells.get((k, e), "—") for e in eps_values)] for k in ks],
                 "GAAS of the mixture: P(all k orthogonal gradient-aligned directions are adversarial) (%).",
                 bold_row=None)


def _num(value: Any, *, percent: bool = False) -> str:
    if not is_number(value):
        return "—"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _comparison_blocks(runs: Sequence[RunData]) -> list[Block]:
    """The mixture row of every run side by side, white-box results only."""
    blocks: list[Block] = [Heading(2, "Comparison of the mixtures")]
    per_run = []
    for run in runs:
        records = [r for r in _group_by_source(run.evals).get(WHITE_BOX, []) if r["model"] == "mixture"]
        per_run.append((run, records))
    all_records = [r for _, recs in per_run for r in recs]
    if not all_records:
        blocks.append(Text("No run has white-box results for its mixture: comparison skipped.", missing=True))
        return blocks + _coherence_comparison(runs)
    cols = _columns(all_records)
    n_shown = common_n(all_records)
    rows, notes = [], Footnotes()
    for run, records in per_run:
        cells = {}
        for rec in records:
            cells[(rec["attack"], rec["eps"])] = _cell(rec, n_shown) + notes.marks(rec["warnings"])
        epoch = next((doc.get("epoch") for _, doc in run.evals if doc.get("kind") == WHITE_BOX), None)
        rows.append([run.name, str(_get(run.config, "train.method") or "—"),
                     f"{epoch:g}" if is_number(epoch) else "—", *(cells.get(c, "—") for c in cols)])
    blocks.append(Table(["run", "method", "epoch", *map(column_label, cols)], rows,
                        "White-box accuracy (%) of each run's mixture; — where a run was not evaluated so; "
                        + _n_text(all_records) + ".",
                        notes.lines, bold_row=None))
    panels: dict[str, list[Curve]] = {}
    for run, records in per_run:
        clean = [r for r in _group_by_source(run.evals).get(WHITE_BOX, []) if r["attack"] == "clean"]
        for attack, panel in _curve_panels([*clean, *records], models="mixture", label=run.name).items():
            panels.setdefault(attack, []).extend(panel.curves)
    if panels:
        png = figures.robustness_figure([Panel(a, c) for a, c in panels.items()],
                                        title="Mixtures compared: white-box accuracy against ε")
        blocks.append(Image("figures/comparison-robustness.png", png,
                            "White-box accuracy of each run's mixture against ε (ε = 0 is clean accuracy)."))
    return blocks + _worst_case_comparison(per_run) + _coherence_comparison(runs)


def _worst_case_comparison(per_run: Sequence[tuple[RunData, Sequence[Mapping[str, Any]]]]) -> list[Block]:
    """Each mixture's per-example worst case over every attack run, beside the cheapest iterative
    attack at the same eps, with 95% intervals: the figure a comparison of defenses should be read from."""
    bars: list[figures.Bar] = []
    eps_values = sorted({r["eps"] for _, recs in per_run for r in recs if r["attack"] == "strongest"})
    if not eps_values:
        return []
    eps = eps_values[len(eps_values) // 2]
    for run, records in per_run:
        at = {r["attack"]: r for r in records if r["eps"] == eps}
        for label, attack in (("PGD-L∞ (cheap)", "pgd-linf"), ("AutoAttack", "autoattack"),
                              ("worst case", "strongest")):
            if attack in at:
                rec = at[attack]
                bars.append(figures.Bar(run.name, label, rec["accuracy"], record_ci95(rec)))
    worst = [b for b in bars if b.series == "worst case"]
    if not worst:
        return []
    png = figures.interval_bars_figure(bars, title=f"Mixtures at ε = {eps:g}: the cheap attack against the worst case")
    names = sorted({a for _, recs in per_run for r in recs if r["attack"] == "strongest" and r["eps"] == eps
                    for a in (r.get("params") or {}).get("attacks", [])})
    return [Image("figures/comparison-worst-case.png", png,
                  f"Each mixture's white-box accuracy at ε = {eps:g} with its 95% Wilson interval: the cheap PGD-L∞ "
                  f"column, AutoAttack where it was run, and the per-example worst case over every attack run "
                  f"({', '.join(names)}). Compare defenses by the worst case.")]


def _coherence_comparison(runs: Sequence[RunData]) -> list[Block]:
    """The runs' coherence histograms overlaid: the GAL paper's Figure 4 (T_Base against T_Div)."""
    blocks: list[Block] = [Heading(3, GRADIENT_HEADING)]
    series = [(run.name, run.analysis["coherence"]) for run in runs
              if run.analysis is not None and run.analysis["coherence"] is not None]
    if not series:
        return blocks + [Text("No run has a coherence list in analysis/gradients.json: overlaid histogram "
                              "skipped (run `phalanx analyze` on the run directories).", missing=True)]
    left_out = [run.name for run in runs if run.name not in {name for name, _ in series}]
    png = figures.coherence_histogram_figure(series, title="Coherence per test example, runs compared")
    blocks.append(Image("figures/comparison-coherence.png", png, COHERENCE_CAPTION + " One line per run"
                        + (f"; without a coherence list: {', '.join(left_out)}." if left_out else ".")))
    rows = []
    for run in runs:
        if run.analysis is None or run.analysis["coherence"] is None:
            continue
        summary = run.analysis.get("coherence_summary")
        summary = summary if isinstance(summary, dict) else {}
        rows.append([run.name, str(_get(run.config, "train.method") or "—"),
                     str(len(run.analysis["coherence"])), _num(summary.get("mean")),
                     _num(summary.get("median")), _num(summary.get("fraction_above_0.5"), percent=True)])
    blocks.append(Table(["run", "method", "examples", "mean coherence", "median coherence",
                         "coherence > 0.5 (%)"], rows, "Coherence of each run's members (GAL paper eq. 7).",
                        bold_row=None))
    return blocks


def build_report(runs: Sequence[RunData], title: str) -> list[Block]:
    """The report as a list of blocks, figures rendered to PNG bytes."""
    blocks: list[Block] = [
        Heading(1, title),
        Text(f"Made from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: "
             + ", ".join(f"{r.name} ({r.path})" for r in runs)
             + ". Accuracies are in %; ε is given in pixel units of [0, 1] images (8/255 = 0.0314)."),
    ]
    if len(runs) > 1:
        blocks += _comparison_blocks(runs)
    for run, slug in zip(runs, _unique_slugs(runs)):
        blocks += _run_blocks(run, slug)
    return blocks


# ---------------------------------------------------------------- rendering


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, title: str | None = None
                 ) -> tuple[Path, Path]:
    """Write `out_dir/report.md`, a self-contained `out_dir/report.html` and `out_dir/figures/*.png`.

    Made from each run directory's `config.yaml`, `metrics.jsonl`, `eval/*.json` and
    `analysis/gradients.json` only; a file that is absent or unreadable skips what needs it and the
    report says so. Every file is written atomically. Returns the Markdown and HTML paths.
    """
    if isinstance(run_dirs, (str, Path)) or not run_dirs:
        raise UsageError("run_dirs must be a non-empty sequence of run directories")
    runs = [read_run_data(d) for d in run_dirs]
    out_dir = Path(out_dir)
    if title is None:
        names = [r.name for r in runs]
        title = "phalanx report: " + (", ".join(names) if len(names) <= 4 else f"{len(names)} runs")
    blocks = build_report(runs, title)
    for block in blocks:
        if isinstance(block, Image):
            figures.save_png(out_dir / block.relpath, block.png)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    write_text_atomic(md_path, to_markdown(blocks))
    write_text_atomic(html_path, to_html(blocks, title))
    return md_path, html_path
