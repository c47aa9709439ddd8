"""`analyze_run`: the GAL paper's gradient analyses of a run, written to analysis/gradients.json."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.config import load_config
from phalanx.data import DatasetName, load_dataset
from phalanx.eval.analysis import GAAS_EPS, analysis_path, analyze_run, coherence_summary
from phalanx.eval.gradients import member_input_gradients
from phalanx.geometry import coherence, pairwise_cosines
from phalanx.files import read_json
from phalanx.presets import resolve_config_path
from phalanx.report import write_report
from phalanx.runs import load_members
from phalanx.train.loop import train

EXAMPLES = 40


def _tiny_run(root, members: int):
    cfg = load_config(resolve_config_path("quickstart/baseline"),
                      ["data.train_subset=128", f"model.members={members}", "train.epochs=1",
                       "train.batch_size=64", "device=cpu"])
    run = root / f"run{members}"
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    run = _tiny_run(tmp_path_factory.mktemp("runs"), members=3)
    return run, analyze_run(run, examples=EXAMPLES, gaas_ks=(4, 16), progress=False)


def test_the_json_has_every_part_with_the_right_lengths_and_ranges(analyzed):
    run, doc = analyzed
    assert read_json(analysis_path(run)) == doc  # verified against its checksum
    assert analysis_path(run) == run / "analysis" / "gradients.json" and not (run / "eval").exists()
    assert (doc["run"], doc["dataset"], doc["epoch"], doc["members"], doc["n"]) == (
        "quickstart-baseline", "digits", 1, 3, EXAMPLES)
    assert doc["pairs"] == [[0, 1], [0, 2], [1, 2]] and doc["notes"] == []
    assert len(doc["coherence"]) == len(doc["gal"]) == EXAMPLES and len(doc["mean_cosine_per_pair"]) == 3
    for c, g in zip(doc["coherence"], doc["gal"]):
        assert -1 - 1e-6 <= c <= 1 + 1e-6
        assert c - 1e-6 <= g <= c + math.log(3) + 1e-6  # a smooth maximum of three cosines
    assert all(-1 - 1e-6 <= m <= 1 + 1e-6 for m in doc["mean_cosine_per_pair"])
    assert doc["coherence_summary"] == coherence_summary(doc["coherence"])


def test_gaas_covers_the_grid_with_the_dataset_eps_and_no_counts(analyzed):
    gaas = analyzed[1]["gaas"]
    assert gaas["ks"] == [4, 16] and gaas["eps_values"] == [0.1, 0.2, 0.3]
    assert [(r["k"], r["eps"]) for r in gaas["results"]] == [(k, e) for k in (4, 16) for e in (0.1, 0.2, 0.3)]
    assert 0 < gaas["n"] <= EXAMPLES
    for r in gaas["results"]:
        assert set(r) == {"k", "eps", "p_all", "p_at_least"}
        assert len(r["p_at_least"]) == r["k"] and r["p_at_least"][-1] == r["p_all"]
        assert all(1 >= a >= b >= 0 for a, b in zip(r["p_at_least"], r["p_at_least"][1:]))


def test_coherence_and_pair_cosines_match_a_recomputation_by_hand(analyzed):
    run, doc = analyzed
    members, _, _ = load_members(run)
    x_u8, y = load_dataset("digits", "test")
    cos = pairwise_cosines(member_input_gradients(members, x_u8[:EXAMPLES].float() / 255, y[:EXAMPLES]))
    assert torch.allclose(torch.tensor(doc["coherence"]), coherence(cos), atol=1e-6)
    assert torch.allclose(torch.tensor(doc["mean_cosine_per_pair"]), cos.mean(0), atol=1e-6)


def test_the_report_of_an_analyzed_run_shows_both_figures(analyzed, tmp_path):
    run, doc = analyzed
    md = write_report([run], tmp_path)[0].read_text()
    assert "### Gradient alignment (GAL paper)" in md
    for name in ("coherence", "gaas"):
        assert (tmp_path / "figures" / f"quickstart-baseline-{name}.png").is_file()
    assert f"| mean coherence | {doc['coherence_summary']['mean']:.3f} |" in md


def test_a_single_member_skips_coherence_with_a_note_and_still_runs_gaas(tmp_path):
    run = _tiny_run(tmp_path, members=1)
    doc = analyze_run(run, examples=EXAMPLES, gaas_ks=(4,), gaas_eps=(0.2,), progress=False)
    assert doc["coherence"] is None and doc["gal"] is None and doc["pairs"] == []
    assert any("single member" in note for note in doc["notes"])
    assert [(r["k"], r["eps"]) for r in doc["gaas"]["results"]] == [(4, 0.2)]
    md = write_report([run], tmp_path / "report")[0].read_text()
    assert "single member" in md and "Coherence histogram skipped" in md


def test_no_ks_skips_gaas(analyzed):
    run, _ = analyzed
    doc = analyze_run(run, examples=5, gaas_ks=(), progress=False)
    assert doc["gaas"] is None and any("GAAS skipped" in note for note in doc["notes"])
    assert len(doc["coherence"]) == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"examples": 0}, "examples must be a positive integer"),
    ({"examples": True}, "examples must be a positive integer"),
    ({"gaas_ks": (25,)}, "no regular Hadamard matrix of order 25"),
    ({"gaas_eps": (0.0,)}, r"GAAS eps must lie in \(0, 1\]"),
    ({"gaas_eps": (1.5,)}, r"GAAS eps must lie in \(0, 1\]"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        analyze_run(tmp_path / "not-even-a-run", **kwargs)


@pytest.mark.parametrize("dataset, eps", [
    ("cifar10", (0.03, 0.06, 0.09)),
    ("mnist", (0.1, 0.2, 0.3)),
    ("fashion-mnist", (0.1, 0.2, 0.3)),
    ("digits", (0.1, 0.2, 0.3)),
])
def test_default_gaas_eps_per_dataset(dataset, eps):
    assert GAAS_EPS[DatasetName(dataset)] == eps


@pytest.mark.parametrize("values, mean, median, above", [
    ([0.2, 0.6, 0.9], 1.7 / 3, 0.6, 2 / 3),
    ([-0.5, 0.5], 0.0, 0.0, 0.0),  # exactly 0.5 is not above the threshold
])
def test_coherence_summary(values, mean, median, above):
    expected = {"mean": mean, "median": median, "fraction_above_0.5": above}
    assert coherence_summary(values) == pytest.approx(expected)
