"""The README's reproduction tables are generated from results/: they must match, cell for cell."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from phalanx.files import write_json_atomic
from phalanx.report.readme_tables import BLOCKS, dverge_report_table, render_readme

ROOT = Path(__file__).resolve().parents[2]


def test_readme_tables_match_the_committed_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = re.findall(r"<!-- results:([\w-]+) -->", readme)
    assert sorted(names) == sorted(BLOCKS)  # every generated table is in the README, once
    assert render_readme(readme, ROOT / "results") == readme, (
        "README.md differs from results/: run `python -m phalanx.report.readme_tables`")


def test_every_results_file_records_its_command_and_epoch():
    files = sorted((ROOT / "results").rglob("*.json"))
    assert files, "results/ holds the evaluation JSON behind the README tables"
    for path in files:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("kind") == "league":  # one entry per defense, each with its epochs and results
            assert isinstance(doc.get("epochs"), int) and doc.get("defenses"), path
            assert all(isinstance(e.get("epochs"), int) and e.get("clean") for e in doc["defenses"].values()), path
            continue
        assert isinstance(doc.get("epoch"), int), path
        assert doc.get("results"), path
    commands = (ROOT / "results" / "COMMANDS.md").read_text(encoding="utf-8")
    for path in files:
        assert str(path.relative_to(ROOT)) in commands, f"{path} has no command in results/COMMANDS.md"


def _doc(accuracy: float) -> dict:
    rows = [{"model": m, "attack": a, "eps": 0.03, "accuracy": accuracy, "n": 100}
            for m in ("member1", "member2", "member3", "mixture")
            for a in ("clean", "fgsm", "pgd-linf-report", "pgd-l2-report", "pgd-linf", "pgd-l2", "autoattack",
                      "strongest")]
    return {"epoch": 7, "results": rows}


def test_a_changed_result_changes_the_table(tmp_path):
    (tmp_path / "dverge-report").mkdir()
    write_json_atomic(tmp_path / "dverge-report" / "table1-vanilla.report.json", _doc(0.5))
    before = dverge_report_table(tmp_path)
    assert "50.0 / 61.76" in before  # ours under the report protocol / the report's member1 clean
    write_json_atomic(tmp_path / "dverge-report" / "table1-vanilla.report.json", _doc(0.25))
    after = dverge_report_table(tmp_path)
    assert "25.0 / 61.76" in after and before != after
    readme = "x\n<!-- results:dverge-report-tables -->\nstale\n<!-- /results:dverge-report-tables -->\ny\n"
    assert "stale" not in render_readme(readme, tmp_path) and "25.0 / 61.76" in render_readme(readme, tmp_path)


def test_an_unknown_block_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a known results table"):
        render_readme("<!-- results:nope -->\n<!-- /results:nope -->", tmp_path)
