"""The README's reproduction tables, generated from the evaluation JSON committed under `results/`.

A number in the README is only as good as the file behind it: each table here is rendered from
`results/` (copies of the `eval/*.json` documents that `phalanx eval` wrote, with the commands
that made them in `results/COMMANDS.md`), and `python -m phalanx.report.readme_tables` rewrites
the README's blocks between `<!-- results:NAME -->` and `<!-- /results:NAME -->` (and draws
`docs/figures/dverge-blackbox-curve.png` from the same files). The default
test suite renders them again and fails when the README and `results/` disagree.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from phalanx.config import load_config
from phalanx.eval.tables import markdown_table
from phalanx.files import read_json
from phalanx.presets import resolve_config_path

Record = Mapping[str, Any]

DVERGE_TABLES = (  # (label, preset with the paper's rows, results stem)
    ("Table 1, vanilla", "dverge-report/table1-vanilla", "dverge-report/table1-vanilla"),
    ("Table 2, DVERGE", "dverge-report/table2-dverge", "dverge-report/table2-dverge"),
    ("Table 3, DVERGE+AdvT", "dverge-report/table3-dverge-advt", "dverge-report/table3-dverge-advt"),
)
REPORT_COLUMNS = (("clean", "clean"), ("FGSM", "fgsm"), ("PGD-L∞", "pgd-linf-report"), ("PGD-L2", "pgd-l2-report"))
STANDARD_COLUMNS = (("clean", "clean"), ("FGSM", "fgsm"), ("PGD-L∞", "pgd-linf"), ("PGD-L2", "pgd-l2"),
                    ("AutoAttack", "autoattack"), ("worst case", "strongest"))
GAL_ROWS = (("T_Base", "gal-paper/table2-conv4-cifar10-base", "gal-paper/base"),
            ("T_Ens", "gal-paper/table2-conv4-cifar10-ens", "gal-paper/ens"),
            ("T_Div", "gal-paper/table2-conv4-cifar10", "gal-paper/div"),
            ("T_Ens+Div", "gal-paper/table2-conv4-cifar10-ens-div", "gal-paper/ens-div"))
GAL_COLUMNS = (("clean", "clean", 0.0), ("FGSM", "fgsm", 0.03), ("FGSM", "fgsm", 0.09), ("R-FGSM", "r-fgsm", 0.03),
               ("R-FGSM", "r-fgsm", 0.09), ("I-FGSM", "i-fgsm", 0.03), ("I-FGSM", "i-fgsm", 0.09),
               ("MI-FGSM", "mi-fgsm", 0.03), ("MI-FGSM", "mi-fgsm", 0.09), ("PGD-CW", "pgd-cw", 0.03),
               ("PGD-CW", "pgd-cw", 0.09))
CURVE_RUNS = (("baseline", "dverge-authors/vanilla"), ("DVERGE", "dverge-authors/dverge"))


def _load(results: Path, stem: str) -> dict[str, Any] | None:
    path = results / f"{stem}.json"
    return read_json(path) if path.is_file() else None


def _find(records: Sequence[Record], model: str, attack: str, eps: float | None = None) -> Record | None:
    for r in records:
        if r["model"] == model and r["attack"] == attack and (eps is None or abs(r["eps"] - eps) < 1e-9):
            return r
    return None


def _pct(record: Record | None) -> str:
    return "—" if record is None else f"{100 * record['accuracy']:.1f}"


def _paper(preset: str) -> dict[str, list[float]]:
    return {k: list(v) for k, v in load_config(resolve_config_path(preset)).paper.get("rows", {}).items()}


def dverge_report_table(results: Path) -> str:
    """Tables 1-3 of the DVERGE report, one row per member and mixture: ours under the report's
    protocol / the report's number, then ours under the standard protocol."""
    header = ["", "epochs", *(f"{name} (report protocol / report)" for name, _ in REPORT_COLUMNS),
              *(f"{name} (standard)" for name, _ in STANDARD_COLUMNS)]
    rows = []
    for label, preset, stem in DVERGE_TABLES:
        report, standard, paper = _load(results, f"{stem}.report"), _load(results, f"{stem}.standard"), _paper(preset)
        for model in ("member1", "member2", "member3", "mixture"):
            theirs = paper.get(model)
            cells = []
            for i, (_, attack) in enumerate(REPORT_COLUMNS):
                ours = _pct(_find(report["results"], model, attack)) if report else "—"
                cells.append(f"{ours} / {theirs[i]:g}" if theirs else f"{ours} / —")
            cells += [_pct(_find(standard["results"], model, attack)) if standard else "—"
                      for _, attack in STANDARD_COLUMNS]
            epochs = (report or standard or {}).get("epoch", "—")
            rows.append([f"{label}: {model}", str(epochs), *cells])
    return markdown_table(header, rows)


def dverge_curve_table(results: Path) -> str:
    """The DVERGE authors' transferability curve: mixture accuracy (%) per eps, white-box PGD-50
    and the per-example worst case over the transfer attacks, for a baseline and a DVERGE ensemble."""
    docs = [(label, _load(results, stem)) for label, stem in CURVE_RUNS]
    eps_all = sorted({row["eps"] for _, doc in docs if doc for row in doc["curve"]})
    header = ["eps"]
    for label, doc in docs:
        epochs = f", {doc['epoch']} epochs" if doc else ""
        header += [f"{label}{epochs}: white-box", f"{label}: transfer (worst of PGD, M-DI²-FGSM)"]
    rows = []
    for eps in eps_all:
        row = [f"{eps:g}"]
        for _, doc in docs:
            point = next((p for p in doc["curve"] if abs(p["eps"] - eps) < 1e-9), {}) if doc else {}
            row += [f"{100 * point[k]:.1f}" if k in point else "—" for k in ("whitebox", "transfer")]
        rows.append(row)
    return markdown_table(header, rows)


def gal_cifar_table(results: Path) -> str:
    """The GAL paper's CIFAR-10 Table 2 (Conv-4): ours / the paper's black-box accuracy (%) per cell."""
    header = ["", "epochs", *(name if eps == 0 else f"{name} {eps:g}" for name, _, eps in GAL_COLUMNS)]
    rows = []
    for label, preset, stem in GAL_ROWS:
        doc, paper = _load(results, stem), _paper(preset)
        theirs = next(iter(paper.values()), None)
        cells = []
        for i, (_, attack, eps) in enumerate(GAL_COLUMNS):
            ours = _pct(_find(doc["results"], "mixture", attack, eps)) if doc else "—"
            cells.append(f"{ours} / {theirs[i]:g}" if theirs else ours)
        rows.append([label, str(doc["epoch"]) if doc else "—", *cells])
    return markdown_table(header, rows)


LEAGUE_STEM = "league/cifar10-conv"  # results/league/cifar10-conv.json: `phalanx league league/cifar10-conv`'s league.json
LEAGUE_FIGURE = Path("docs/figures/league-cifar10-conv.png")


def league_block(results: Path) -> str:
    """The CIFAR-10 seed-Conv league: one row per defense (epochs, training time, n, clean, white-box
    and transfer worst cases with 95% intervals), and its figure."""
    from phalanx.eval.tables import markdown_table
    from phalanx.league import league_table, league_title

    doc = _load(results, LEAGUE_STEM)
    if doc is None:
        return "Not run yet (results/league/cifar10-conv.json is absent)."
    return (f"{league_title(doc)}.\n\n{markdown_table(*league_table(doc))}\n\n"
            f"![the mixture's white-box worst case against clean accuracy, one point per defense]({LEAGUE_FIGURE})")


def league_figure_png(results: Path) -> bytes | None:
    from phalanx.league import league_points_figure

    doc = _load(results, LEAGUE_STEM)
    return None if doc is None else league_points_figure(doc)


CURVE_FIGURE = Path("docs/figures/dverge-blackbox-curve.png")


def dverge_curve_figure(results: Path) -> bytes | None:
    """The curve table as a figure: white-box and transfer accuracy against eps, both ensembles."""
    from phalanx.report.figures import Curve, Panel, robustness_figure

    docs = [(label, _load(results, stem)) for label, stem in CURVE_RUNS]
    panels = []
    for key, title in (("whitebox", "white-box PGD-50 (5 restarts)"),
                       ("transfer", "transfer from a vanilla ensemble (worst case)")):
        curves = [Curve(f"{label} ({doc['epoch']} epochs)", [p["eps"] for p in doc["curve"] if key in p],
                        [p[key] for p in doc["curve"] if key in p]) for label, doc in docs if doc]
        panels.append(Panel(title, curves))
    if not any(panel.curves for panel in panels):
        return None
    return robustness_figure(panels, title="DVERGE authors' protocol, seed-Conv mixtures on CIFAR-10 (JPEG-decoded copy)")


BLOCKS: dict[str, Callable[[Path], str]] = {
    "dverge-report-tables": dverge_report_table,
    "dverge-blackbox-curve": dverge_curve_table,
    "gal-cifar10-table2": gal_cifar_table,
    "league-cifar10-conv": league_block,
}

_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def render_readme(readme_text: str, results: Path) -> str:
    """`readme_text` with every results block replaced by its table rendered from `results`."""
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise ValueError(f"README block {name!r} is not a known results table; known: {sorted(BLOCKS)}")
        return f"{match[1]}{BLOCKS[name](results)}\n{match[4]}"
    return _BLOCK.sub(fill, readme_text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--results", default="results")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README differs from results/")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    new = render_readme(text, Path(args.results))
    if args.check:
        if new != text:
            print(f"{readme} differs from {args.results}/: run python -m phalanx.report.readme_tables", file=sys.stderr)
            return 1
        return 0
    from phalanx.files import write_bytes_atomic

    if new != text:
        write_bytes_atomic(readme, new.encode("utf-8"))
    for figure, draw in ((CURVE_FIGURE, dverge_curve_figure), (LEAGUE_FIGURE, league_figure_png)):
        png = draw(Path(args.results))
        if png is not None:
            path = readme.parent / figure
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
