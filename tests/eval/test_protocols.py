"""Named evaluation protocols on tiny real runs: the report's script and the DVERGE authors' curve."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from phalanx.cli import main
from phalanx.config import load_config
from phalanx.eval.protocols import (
    LABELS, Protocol, evaluate_authors_protocol, evaluate_report_protocol, last_batch_accuracies,
    transferability_curve,
)
from phalanx.train.loop import train

TINY = ["data.dataset=digits", "data.train_subset=300", "model.members=2", "train.epochs=1",
        "train.batch_size=64", "device=cpu", "optim.name=adam", "optim.lr=0.003", "eval.examples=40"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol-runs")
    held = [*TINY, "data.val_size=70", "data.val_from=head"]
    target = train(load_config(None, [*held, "seed=0"]), root / "target", progress=False)
    surrogate = train(load_config(None, [*held, "seed=1"]), root / "surrogate", progress=False)
    no_holdout = train(load_config(None, [*TINY, "seed=2"]), root / "no-holdout", progress=False)
    return target, surrogate, no_holdout


class _Constant(nn.Module):
    """Predicts class 0 for every input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()


def test_clean_accuracy_counts_only_the_last_batch_of_each_pass():
    x = torch.rand(33, 1, 4, 4)
    y = torch.ones(33, dtype=torch.long)
    y[5] = 0  # the only example the constant model gets right
    values = last_batch_accuracies(_Constant(), x, y, batch_size=32, passes=200, seed=0)
    assert set(values) <= {0.0, 1.0}  # a last batch of one example: 0 or 100%, never 1/33
    assert 0 < sum(values) < 20  # example 5 lands last in about 1 pass in 33
    full = last_batch_accuracies(_Constant(), x[:32], y[:32], batch_size=32, passes=3, seed=0)
    assert full == [1 / 32] * 3  # 32 examples: the last batch is the whole set


def test_report_protocol_measures_the_heldout_split_with_the_reports_attacks(runs):
    target, _, _ = runs
    doc = evaluate_report_protocol(target)
    assert doc["protocol"] == "dverge-report" and doc["label"] == "report protocol"
    assert "70" in doc["split"]
    attacks = {(r["model"], r["attack"]) for r in doc["results"]}
    assert {("mixture", a) for a in ("clean", "fgsm", "pgd-linf-report", "pgd-l2-report")} <= attacks
    l2 = next(r for r in doc["results"] if r["model"] == "mixture" and r["attack"] == "pgd-l2-report")
    assert l2["n"] == 70 and l2["params"]["steps"] == 5
    assert l2["max_perturbation"] > 0.03  # the report's L2 attack leaves the 0.03 ball ...
    assert l2["max_perturbation"] <= l2["budget"] + 1e-5  # ... but not its own reach
    assert not any(r.get("warnings") for r in doc["results"])  # last-batch clean accuracy is not the reference
    clean = next(r for r in doc["results"] if r["model"] == "mixture" and r["attack"] == "clean")
    assert clean["repeats"] == 10 and clean["n"] == 10 * 70  # 70 < 256: the last batch is the whole set
    assert clean["accuracy"] == pytest.approx(clean["accuracy_attacked"])
    saved = json.loads((target / "eval" / "dverge-report.json").read_text())
    assert saved["results"][0]["protocol"] == "dverge-report"


def test_report_protocol_refuses_a_run_without_heldout_data(runs):
    _, _, no_holdout = runs
    with pytest.raises(ValueError, match="data.val_size = 0"):
        evaluate_report_protocol(no_holdout)


def test_cli_protocol_flag_and_refusals(runs, capsys):
    target, _, _ = runs
    assert main(["eval", str(target), "--protocol", "dverge-report", "--quiet"]) == 0
    assert "report protocol" in capsys.readouterr().out
    assert main(["eval", str(target), "--protocol", "dverge-report", "--attack", "fgsm"]) == 2
    assert "fixes its own attacks" in capsys.readouterr().err
    assert main(["eval", str(target), "--protocol", "dverge-authors"]) == 2
    assert "--transfer-from" in capsys.readouterr().err


def test_authors_protocol_gives_a_curve_whose_worst_case_is_below_each_attack(runs, tmp_path):
    target, surrogate, _ = runs
    doc = evaluate_authors_protocol(target, surrogate, examples=40, eps_grid=(0.05, 0.2), transfer_dir=tmp_path)
    assert doc["label"] == LABELS[Protocol.DVERGE_AUTHORS]
    assert [row["eps"] for row in doc["curve"]] == [0.05, 0.2]
    for row in doc["curve"]:
        assert row["transfer"] <= min(row["pgd-linf"], row["m-di2-fgsm"]) + 1e-9
        assert "sgm" not in row  # a Conv surrogate has no skip connections
    whitebox = [r for r in doc["results"] if r["source"] == "white-box"]
    white = {r["eps"]: r for r in whitebox if r["attack"] == "pgd-linf"}
    assert white[0.05]["params"]["steps"] == 50 and white[0.05]["params"]["restarts"] == 5
    assert white[0.05]["params"]["alpha"] == pytest.approx(0.01)
    assert {r["model"] for r in whitebox} == {"mixture"}
    assert doc["curve"][1]["whitebox"] <= doc["curve"][0]["whitebox"]
    with pytest.raises(ValueError, match="separately trained"):
        evaluate_authors_protocol(target, target, examples=40, eps_grid=(0.05,))


def test_curve_pairs_each_eps():
    white = [{"model": "mixture", "attack": "pgd-linf", "eps": 0.01, "accuracy": 0.5}]
    transfer = [{"model": "mixture", "attack": "strongest", "eps": 0.01, "accuracy": 0.7},
                {"model": "member1", "attack": "strongest", "eps": 0.01, "accuracy": 0.1}]
    assert transferability_curve(white, transfer) == [{"eps": 0.01, "whitebox": 0.5, "transfer": 0.7}]


def test_report_keeps_protocol_results_apart_from_the_standard_tables(runs, tmp_path):
    from phalanx.report.render import write_report

    target, _, _ = runs
    evaluate_report_protocol(target)
    main(["eval", str(target), "--attack", "fgsm", "--eps", "0.1", "--quiet"])
    write_report([target], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "under the report protocol" in text
    standard = text.split("#### White-box accuracy (%)\n")[1].split("####")[0]
    assert "fgsm" in standard and "report" not in standard


def test_reproduce_puts_the_reports_columns_beside_report_protocol_records():
    from phalanx.presets import resolve_config_path
    from phalanx.reproduce import side_by_side

    paper = dict(load_config(resolve_config_path("dverge-report/table1-vanilla")).paper)
    assert paper["protocol"] == "dverge-report"
    records = [{"model": "member1", "attack": a, "eps": e, "accuracy": 0.5, "n": 1024}
               for a, e in (("clean", 0.0), ("fgsm", 0.03), ("pgd-linf-report", 0.03), ("pgd-l2-report", 0.03))]
    _, rows = side_by_side(records, paper)
    assert "—" not in " ".join(rows[0][2:])  # every report column finds its report-protocol record
    assert rows[0][-1].endswith("/ 43.26")
