"""Tables in the seed report's layout: member rows plus the mixture row; clean then attack columns."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from phalanx.eval.stats import record_ci95, record_n

CI_NOTE = ("accuracy in % ± the larger distance to a bound of its 95% Wilson interval (exact bounds: "
           "`ci95` in the JSON); n: test examples per cell (a cell with another n says so)")


def ci_margin(record: Mapping[str, Any]) -> float | None:
    """The larger distance (percentage points) from a record's accuracy to a bound of its 95% interval,
    rounded up to 0.1 so that "±" never understates it; None when the record has no usable n.

    The Wilson interval is asymmetric near 0% and 100% (0 of 360: [0, 1.06%]); the larger side keeps
    "0.0 ±1.1" honest where the half-width would say ±0.6.
    """
    ci = record_ci95(record)
    if ci is None:
        return None
    acc = 100 * record["accuracy"]
    margin = max(acc - 100 * ci[0], 100 * ci[1] - acc)
    return math.ceil(round(margin * 10, 6)) / 10


def common_n(records: Sequence[Mapping[str, Any]]) -> int | None:
    """The n most of `records` share (the first seen on a tie); None when none has a usable n."""
    counts = Counter(n for n in map(record_n, records) if n is not None)
    return counts.most_common(1)[0][0] if counts else None


def accuracy_cell(record: Mapping[str, Any], *, n_shown: int | None = None, digits: int = 1, mark: str = "") -> str:
    """A terminal table cell: "62.3 ±3.1" (see `ci_margin`), `mark` right after the numbers; a clean
    accuracy averaged over random subsets adds their spread "(sd 0.4)"; an n other than `n_shown`
    (the row's or table's n) is written in the cell: "62.3 ±3.1 n=64"."""
    cell = f"{100 * record['accuracy']:.{digits}f}"
    margin = ci_margin(record)
    cell += f" ±{margin:.1f}" if margin is not None else " ±?"
    cell += mark
    if record.get("repeats", 1) > 1:
        cell += f" (sd {100 * record['accuracy_std']:.{digits}f})"
    n = record_n(record)
    if n != n_shown:
        cell += f" n={n if n is not None else '?'}"
    return cell


def column_name(record: Mapping[str, Any]) -> str:
    if record["attack"] == "clean":
        return "clean"
    return f"{record['attack']} {record['eps']:g}"


def accuracy_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows from evaluation records, in the order they were measured: model, n (the test
    examples behind the row's cells), then one "accuracy ±95% margin" cell per column (`accuracy_cell`;
    `CI_NOTE` says what the cells mean)."""
    columns: list[str] = []
    by_model: dict[str, dict[str, Mapping[str, Any]]] = {}
    for rec in records:
        col = column_name(rec)
        if col not in columns:
            columns.append(col)
        by_model.setdefault(rec["model"], {})[col] = rec
    header = ["model", "n", *columns]
    rows = []
    for model, cells in by_model.items():
        n = common_n(list(cells.values()))
        rows.append([model, "?" if n is None else str(n),
                     *(accuracy_cell(cells[c], n_shown=n) if c in cells else "—" for c in columns)])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width table for terminals."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join([*lines, *(fmt.format(*r) for r in rows)])


def paired_eps_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The GAL paper's Table 2 layout: one row per model with its n; clean, then one column per attack
    whose cell lists the accuracies at its eps values in increasing order, each with its 95% margin
    (`accuracy_cell`), e.g. "91.4 ±2.9 / 9.7 ±3.1".

    Header cells name the eps values: "fgsm (0.1 / 0.3)". Records flagged with warnings get a "!".
    """
    attacks: list[str] = []
    eps_of: dict[str, set[float]] = {}
    by_model: dict[str, dict[tuple[str, float], Mapping[str, Any]]] = {}
    for rec in records:
        if rec["attack"] != "clean" and rec["attack"] not in attacks:
            attacks.append(rec["attack"])
        if rec["attack"] != "clean":
            eps_of.setdefault(rec["attack"], set()).add(rec["eps"])
        by_model.setdefault(rec["model"], {})[(rec["attack"], rec["eps"])] = rec
    header = ["model", "n", "clean"] + [f"{a} ({' / '.join(f'{e:g}' for e in sorted(eps_of[a]))})" for a in attacks]
    rows = []
    for model, recs in by_model.items():
        n = common_n(list(recs.values()))

        def cell(key: tuple[str, float]) -> str:
            rec = recs.get(key)
            return "—" if rec is None else accuracy_cell(rec, n_shown=n, mark="!" if rec.get("warnings") else "")

        clean = next((cell(k) for k in recs if k[0] == "clean"), "—")
        rows.append([model, "?" if n is None else str(n), clean]
                    + [" / ".join(cell((a, e)) for e in sorted(eps_of[a])) for a in attacks])
    return header, rows


def curve_table(curve: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The DVERGE authors' transferability curve, one row per eps: white-box, each transfer attack,
    and the transfer worst case, in %."""
    keys = [k for k in ("whitebox", "pgd-linf", "m-di2-fgsm", "sgm", "transfer") if any(k in row for row in curve)]
    names = {"whitebox": "white-box PGD-50", "transfer": "transfer (worst case)"}
    header = ["eps", *(names.get(k, f"transfer {k}") for k in keys)]
    rows = [[f"{row['eps']:g}", *(f"{100 * row[k]:.1f}" if k in row else "-" for k in keys)] for row in curve]
    return header, rows
