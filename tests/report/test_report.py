import base64
import json
import re

import pytest
import yaml

from phalanx.report import write_report
from phalanx.report.figures import eps_label
from phalanx.report.run_data import read_run_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPS = [2 / 255, 4 / 255, 8 / 255]
PGD_WARNING = "accuracy rose with more steps: possible gradient masking"


def _config(name, method, members=3):
    return {"name": name, "seed": 0, "data": {"dataset": "cifar10"},
            "model": {"arch": "conv", "members": members},
            "optim": {"name": "sgd", "lr": 0.001, "momentum": 0.9},
            "train": {"method": method, "epochs": 4, "batch_size": 32},
            "paper": {"source": "DVERGE report, Table 1", "columns": ["clean", "fgsm 0.03"],
                      "rows": {"member1": [61.76, 4.10]}}}


def _metrics(members=3, epochs=4, diagnostics=True):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "lr": 0.001, "train_loss": [2.0 / e + 0.1 * i for i in range(members)],
               "val_member_loss": [2.1 / e + 0.05 * i for i in range(members)],
               "val_member_acc": [0.3 + 0.05 * e + 0.01 * i for i in range(members)],
               "val_mixture_loss": 1.9 / e, "val_mixture_acc": 0.35 + 0.05 * e, "val_source": "test",
               "epoch_seconds": 1.5, "layer": e % 3 + 1}
        if diagnostics and e % 2 == 0:
            row["diagnostics"] = {
                "transferability": [[0.05 if i == j else 0.6 + 0.01 * e for j in range(members)]
                                    for i in range(members)],
                "vulnerability_diversity": [[0.0 if i == j else 1.2 for j in range(members)]
                                            for i in range(members)],
            }
        rows.append(row)
    return rows


def _record(model, attack, eps, acc, **extra):
    return {"model": model, "attack": attack, "eps": eps, "accuracy": acc, "n": 1000, "params": {},
            "source": "white-box", "seed": 0, "wall_time_s": 0.1, **extra}


def _whitebox(name, method, members=3, offset=0.0):
    models = [f"member{i + 1}" for i in range(members)] + ["mixture"]
    results = []
    for k, model in enumerate(models):
        base = 0.6176 if model == "member1" else 0.60 + 0.01 * k + offset
        results.append(_record(model, "clean", 0.0, base, accuracy_std=0.004, repeats=10))
        results.append(_record(model, "fgsm", 0.03, 0.041 + 0.01 * k + offset,
                               params={"name": "fgsm", "eps": 0.03}))
        for j, eps in enumerate(EPS):
            extra = {"warnings": [PGD_WARNING]} if model == "mixture" and j == 2 else {}
            results.append(_record(model, "pgd-linf", eps, 0.5 - 0.15 * j + offset,
                                   params={"name": "pgd-linf", "eps": eps, "alpha": 0.007, "steps": 10},
                                   **extra))
    return {"kind": "white-box", "run": name, "dataset": "cifar10", "dataset_display": "CIFAR-10",
            "method": method, "arch": "conv", "epoch": 4, "results": results}


def _make_run(root, name, method, *, metrics=True, evaluation=True, config=True, offset=0.0):
    run = root / name
    run.mkdir()
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump(_config(name, method)))
    if metrics:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics()))
    if evaluation:
        (run / "eval").mkdir()
        (run / "eval" / "whitebox.json").write_text(json.dumps(_whitebox(name, method, offset=offset)))
    return run


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path
    return data


def _markdown_row(md, first_cell):
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row for {first_cell}"
    return [c.strip() for c in rows[0].strip("|").split("|")]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [_make_run(root, "vanilla", "baseline"), _make_run(root, "dverge", "dverge", offset=0.1)]


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory):
    """The report of the two runs, written once for the tests that only read it."""
    out = tmp_path_factory.mktemp("report")
    md_path, html_path = write_report(two_runs, out, title="Two runs")
    assert md_path == out / "report.md" and html_path == out / "report.html"
    return md_path, html_path


def test_report_writes_markdown_html_and_every_figure(report):
    md_path, html_path = report
    out = md_path.parent

    expected = {f"{run}-{kind}.png" for run in ("vanilla", "dverge")
                for kind in ("loss", "robustness", "transferability", "vulnerability-diversity")}
    expected.add("comparison-robustness.png")
    assert {p.name for p in (out / "figures").iterdir()} == expected
    pngs = {name: _assert_png(out / "figures" / name) for name in expected}

    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == len(expected)
    embedded = set(re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html))
    assert embedded == {base64.b64encode(png).decode() for png in pngs.values()}
    assert "<table>" in html and "<style>" in html and "Two runs" in html

    md = md_path.read_text()
    for name in expected:
        assert f"(figures/{name})" in md
    assert not list(out.glob(".*.tmp")) and not list((out / "figures").glob(".*.tmp"))


def test_table_numbers_match_the_json_in_the_seed_layout(report):
    md = report[0].read_text()
    header = _markdown_row(md, "model")
    assert header == ["model", "clean", "fgsm 0.03", "pgd-linf 2/255", "pgd-linf 4/255", "pgd-linf 8/255"]
    member1 = _markdown_row(md, "member1")
    # accuracy (mean ± std over the clean repeats), then the 95% Wilson interval of k of n = 1000
    # (scipy.stats.binomtest(k, 1000).proportion_ci(method="wilson"))
    assert member1[1] == "61.76 ± 0.40 (58.7–64.8)"
    assert member1[2] == "4.10 (3.0–5.5)"
    assert member1[3:] == ["50.00 (46.9–53.1)", "35.00 (32.1–38.0)", "20.00 (17.6–22.6)"]
    assert "n = 1000 test examples per cell; in parentheses the 95% Wilson confidence interval" in md
    # Members first, the mixture row last, in each run's table.
    section = md.split("## Run: vanilla")[1].split("## Run:")[0]
    models = [line.split("|")[1].strip() for line in section.splitlines()
              if re.match(r"\| (\*\*)?(member\d|mixture)", line)]
    assert models[:4] == ["member1", "member2", "member3", "**mixture**"]


def test_warnings_are_marked_next_to_the_number_and_footnoted(report):
    md_path, html_path = report
    md = md_path.read_text()
    mixture = _markdown_row(md, "**mixture**")
    assert mixture[-1] == "20.00 (17.6–22.6) ⚠1"
    assert f"⚠1 {PGD_WARNING}" in md
    assert PGD_WARNING in html_path.read_text()


def test_comparison_puts_each_mixture_side_by_side(report):
    md = report[0].read_text()
    comparison = md.split("## Comparison of the mixtures")[1].split("## Run:")[0]
    vanilla = _markdown_row(comparison, "vanilla")
    dverge = _markdown_row(comparison, "dverge")
    assert vanilla[:4] == ["vanilla", "baseline", "4", "63.00 ± 0.40 (60.0–65.9)"]
    assert dverge[:4] == ["dverge", "dverge", "4", "73.00 ± 0.40 (70.2–75.7)"]
    assert dverge[-1] == "30.00 (27.2–32.9) ⚠1"
    assert "n = 1000 test examples per cell" in comparison


def test_intervals_come_from_the_json_or_are_computed_and_an_odd_n_is_shown_in_its_cell(tmp_path):
    run = _make_run(tmp_path, "mixed", "baseline", evaluation=False)
    (run / "eval").mkdir()
    records = [_record("mixture", "clean", 0.0, 0.5, ci95=[0.25, 0.75]),  # stored: shown as is
               _record("mixture", "fgsm", 0.03, 0.5),  # older file, no ci95: computed from accuracy and n
               _record("mixture", "pgd-linf", 8 / 255, 0.5, n=100),
               {"model": "mixture", "attack": "pgd-linf", "eps": 16 / 255, "accuracy": 0.25}]  # no n at all
    (run / "eval" / "whitebox.json").write_text(json.dumps({"kind": "white-box", "results": records}))
    md = write_report([run], tmp_path / "out")[0].read_text()
    cells = _markdown_row(md, "**mixture**")[1:]
    assert cells == ["50.00 (25.0–75.0)", "50.00 (46.9–53.1)", "50.00 (40.4–59.6, n=100)", "25.00 (n unknown)"]
    assert "n = 1000 test examples per cell unless the cell gives its own n" in md


def test_reported_paper_numbers_and_run_settings_are_shown(tmp_path, two_runs):
    md = write_report(two_runs[:1], tmp_path / "out")[0].read_text()
    assert "Reported: DVERGE report, Table 1" in md
    assert "layer drawn per epoch (DVERGE): 2, 3, 1, 2" in md
    assert "validation (test split)" in md
    assert "## Comparison" not in md  # one run: nothing to compare


def test_a_run_with_nothing_but_a_directory_still_gets_a_report(tmp_path):
    bare = _make_run(tmp_path, "bare", "baseline", metrics=False, evaluation=False, config=False)
    md_path, html_path = write_report([bare], tmp_path / "out")
    md = md_path.read_text()
    assert "no config.yaml" in md
    assert "no metrics.jsonl" in md
    assert "no eval/*.json" in md
    assert "heatmap skipped" in md
    assert "data:image/png;base64," not in html_path.read_text()
    assert not (tmp_path / "out" / "figures").exists() or not list((tmp_path / "out" / "figures").iterdir())


def test_a_run_without_eval_beside_a_full_one(tmp_path):
    full = _make_run(tmp_path, "full", "dverge")
    noeval = _make_run(tmp_path, "noeval", "baseline", evaluation=False)
    md = write_report([full, noeval], tmp_path / "out")[0].read_text()
    assert _markdown_row(md, "noeval")[3:] == ["—"] * 5
    _assert_png(tmp_path / "out" / "figures" / "noeval-loss.png")
    assert not (tmp_path / "out" / "figures" / "noeval-robustness.png").exists()


def test_malformed_files_are_skipped_and_reported(tmp_path):
    run = _make_run(tmp_path, "broken", "baseline")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    (run / "eval" / "transfer.json").write_text(json.dumps({"kind": "transfer", "results": [
        _record("mixture", "pgd-linf", 8 / 255, 0.4321, source="transfer:vanilla"), {"model": "mixture"}]}))
    (run / "eval" / "junk.json").write_text("[1, 2")
    data = read_run_data(run)
    assert any("1 unreadable line" in m for m in data.missing)
    assert any("junk.json" in m for m in data.missing)
    assert any("1 malformed record" in m for m in data.missing)
    md = write_report([run], tmp_path / "out")[0].read_text()
    assert "crafted on vanilla" in md and "43.21" in md


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="non-empty sequence"):
        write_report([], tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")


@pytest.mark.parametrize("eps, label", [(8 / 255, "8/255"), (2 / 255, "2/255"), (0.03, "7.65/255"),
                                        (0.5, "127.5/255")])
def test_eps_label(eps, label):
    assert eps_label(eps) == label


def test_l2_radii_are_plain_numbers_and_kindless_whitebox_files_count_as_white_box(tmp_path):
    run = _make_run(tmp_path, "l2", "baseline", evaluation=False)
    (run / "eval").mkdir()
    records = [{"model": "mixture", "attack": "pgd-l2", "eps": eps, "accuracy": acc}
               for eps, acc in ((0.5, 0.4), (1.0, 0.2))]
    (run / "eval" / "whitebox.json").write_text(json.dumps({"results": records}))
    md = write_report([run], tmp_path / "out")[0].read_text()
    assert _markdown_row(md, "model") == ["model", "pgd-l2 0.5", "pgd-l2 1"]
    assert "White-box accuracy (%)" in md
    _assert_png(tmp_path / "out" / "figures" / "l2-robustness.png")


# ---------------------------------------------------------------- gradient alignment (GAL paper)

GAAS_KS, GAAS_EPS = (4, 16, 36, 64), (0.03, 0.06, 0.09)


def _gradients(coherence, members=3):
    """An analysis/gradients.json as `phalanx analyze` writes it (numbers made up)."""
    results = [{"k": k, "eps": e, "p_all": round(0.9 / (1 + k * e), 4), "p_at_least": [0.9] * k}
               for k in GAAS_KS for e in GAAS_EPS]
    mean = sum(coherence) / len(coherence)
    return {"kind": "gradient-alignment", "run": "x", "epoch": 4, "dataset": "cifar10", "n": len(coherence),
            "members": members, "pairs": [[0, 1], [0, 2], [1, 2]], "coherence": coherence,
            "gal": [c + 1.0 for c in coherence], "mean_cosine_per_pair": [0.1, 0.2, 0.3],
            "coherence_summary": {"mean": mean, "median": sorted(coherence)[len(coherence) // 2],
                                  "fraction_above_0.5": sum(c > 0.5 for c in coherence) / len(coherence)},
            "gaas": {"n": 90, "ks": list(GAAS_KS), "eps_values": list(GAAS_EPS), "results": results},
            "notes": []}


def _add_gradients(run, doc):
    (run / "analysis").mkdir(exist_ok=True)
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (run / "analysis" / "gradients.json").write_text(text)
    return run


@pytest.fixture(scope="module")
def analyzed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyzed")
    base = _make_run(root, "t_base", "baseline")
    div = _make_run(root, "t_div", "gal")
    _add_gradients(base, _gradients([0.6 + 0.004 * i for i in range(100)]))
    _add_gradients(div, _gradients([-0.3 + 0.005 * i for i in range(100)]))
    return base, div


def test_an_analyzed_run_gets_both_figures_and_tables_that_match_the_json(analyzed_runs, tmp_path):
    run = analyzed_runs[0]
    doc = json.loads((run / "analysis" / "gradients.json").read_text())
    md = write_report([run], tmp_path)[0].read_text()
    section = md.split("### Gradient alignment (GAL paper)")[1]
    for kind in ("coherence", "gaas"):
        _assert_png(tmp_path / "figures" / f"t_base-{kind}.png")
        assert f"(figures/t_base-{kind}.png)" in section
    summary = doc["coherence_summary"]
    assert _markdown_row(section, "mean coherence")[1] == f"{summary['mean']:.3f}"
    above = _markdown_row(section, "examples with coherence > 0.5 (%)")[1]
    assert above == f"{100 * summary['fraction_above_0.5']:.1f}"
    assert _markdown_row(section, "mean cosine, members 2 and 3")[1] == "0.300"
    assert _markdown_row(section, "k") == ["k", "ε = 0.03 (7.65/255)", "ε = 0.06 (15.3/255)",
                                           "ε = 0.09 (22.95/255)"]
    p_all = {(r["k"], r["eps"]): r["p_all"] for r in doc["gaas"]["results"]}
    for k in GAAS_KS:
        assert _markdown_row(section, str(k))[1:] == [f"{100 * p_all[(k, e)]:.1f}" for e in GAAS_EPS]
    assert "no analysis/gradients.json" not in md


def test_the_comparison_overlays_the_runs_coherence_histograms(analyzed_runs, tmp_path):
    md = write_report(list(analyzed_runs), tmp_path)[0].read_text()
    comparison = md.split("## Comparison of the mixtures")[1].split("## Run:")[0]
    assert "(figures/comparison-coherence.png)" in comparison
    _assert_png(tmp_path / "figures" / "comparison-coherence.png")
    table = comparison.split("### Gradient alignment")[1]
    for run in analyzed_runs:
        summary = json.loads((run / "analysis" / "gradients.json").read_text())["coherence_summary"]
        assert _markdown_row(table, run.name)[3:5] == [f"{summary['mean']:.3f}", f"{summary['median']:.3f}"]


def test_runs_without_analysis_say_so_and_the_comparison_skips_the_histogram(report):
    md = report[0].read_text()
    assert "no analysis/gradients.json" in md and "overlaid histogram skipped" in md
    assert "coherence.png" not in md


@pytest.mark.parametrize("content, message", [
    ("{not json", "analysis/gradients.json could not be read (JSONDecodeError)"),
    ("[1, 2]", "analysis/gradients.json is not a JSON object"),
    ({"coherence": "high", "gaas": {"results": [{"k": 4}]}},
     "holds neither a coherence list nor GAAS results"),
])
def test_a_malformed_gradients_json_is_reported_missing_not_a_crash(tmp_path, content, message):
    run = _add_gradients(_make_run(tmp_path, "broken", "gal"), content)
    assert read_run_data(run).analysis is None
    md = write_report([run], tmp_path / "out")[0].read_text()
    assert message in md and "No usable analysis/gradients.json" in md
    assert not list((tmp_path / "out" / "figures").glob("*-coherence.png"))


def test_a_malformed_part_is_skipped_and_the_rest_is_shown(tmp_path):
    doc = _gradients([0.1, 0.2, 0.3])
    doc["coherence"] = [0.1, "x"]
    run = _add_gradients(_make_run(tmp_path, "half", "gal"), doc)
    md = write_report([run], tmp_path / "out")[0].read_text()
    assert "malformed `coherence` list" in md and "Coherence histogram skipped" in md
    _assert_png(tmp_path / "out" / "figures" / "half-gaas.png")
    assert not (tmp_path / "out" / "figures" / "half-coherence.png").exists()


def test_the_comparison_figure_of_the_worst_case_appears_when_runs_have_one(tmp_path):
    runs = []
    for k, name in enumerate(("base", "div")):
        run = _make_run(tmp_path, name, "baseline", offset=0.05 * k)
        doc = json.loads((run / "eval" / "whitebox.json").read_text())
        doc["results"].append(_record("mixture", "strongest", EPS[1], 0.2 + 0.05 * k,
                                      params={"norm": "linf", "attacks": ["pgd-linf", "autoattack"]}))
        (run / "eval" / "whitebox.json").write_text(json.dumps(doc))
        runs.append(run)
    md_path, _ = write_report(runs, tmp_path / "out", title="worst case")
    _assert_png(tmp_path / "out" / "figures" / "comparison-worst-case.png")
    assert "per-example worst case over every attack run (autoattack, pgd-linf)" in md_path.read_text()


def test_no_worst_case_figure_without_a_worst_case(report):
    assert not (report[0].parent / "figures" / "comparison-worst-case.png").exists()
