"""`phalanx league`: every ensemble defense, one budget, one protocol, one table."""

import contextlib
import io
import json
import re

import pytest

from phalanx.cli import main
from phalanx.config import ConfigError
from phalanx.league import ALL_METHODS, SURROGATE, league_runs, load_league_config
from phalanx.presets import list_presets, resolve_config_path

# The digits league shrunk to run in about a minute on one core: 1 epoch on 192 digits, 16 test
# digits (AutoAttack's targeted stages, FAB and Square dominate the time).
TINY = ["--set", "epochs=1", "--set", "data.train_subset=192", "--set", "examples=16", "--set", "device=cpu"]


def _league(*extra: str) -> object:
    return load_league_config(resolve_config_path("league/digits"), list(extra))


@pytest.fixture(scope="module")
def digits_league(tmp_path_factory):
    """The tiny digits league run twice through the CLI: (out dir, league.json, first stdout,
    second stdout, the runs' files before the second run)."""
    out = tmp_path_factory.mktemp("league") / "digits"
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        assert main(["league", "league/digits", "--out", str(out), "--quiet", *TINY]) == 0
    trained = _run_files(out)
    second = io.StringIO()
    with contextlib.redirect_stdout(second):
        assert main(["league", "league/digits", "--out", str(out), *TINY]) == 0
    return out, json.loads((out / "league.json").read_text()), first.getvalue(), second.getvalue(), trained


def _run_files(out):
    """Every training record of every run: metrics.jsonl and the checkpoints, as bytes."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.glob("*/metrics.jsonl"))
            + sorted(out.glob("*/checkpoints/*"))}


def test_the_league_measures_every_defense_under_one_protocol(digits_league):
    out, doc, stdout, _, _ = digits_league
    assert list(doc["defenses"]) == list(ALL_METHODS)
    for method, entry in doc["defenses"].items():
        assert entry["method"] == method and entry["epochs"] == 1 and entry["run"] == str(out / method)
        clean, white, transfer = entry["clean"], entry["whitebox_worst_case"], entry["transfer_worst_case"]
        assert clean["n"] == white["n"] == transfer["n"] == 16
        for rec in (clean, white, transfer):
            assert rec["ci95"][0] <= rec["accuracy"] <= rec["ci95"][1]
        # an example robust in the worst case is classified correctly clean: never above clean
        assert white["accuracy"] <= clean["accuracy"] and transfer["accuracy"] <= clean["accuracy"]
        replayed = json.loads((out / method / "eval" / "league-transfer.json").read_text())["results"]
        same = next(r for r in replayed if r["model"] == "mixture" and r["attack"] == "clean")
        assert same["accuracy"] == pytest.approx(clean["accuracy"], abs=1e-9)  # the same 16 test images
        assert {"apgd-ce-mean-logits", "autoattack", "apgd-mora"} <= set(white["attacks"])
        assert set(transfer["attacks"]) == {"pgd-linf", "m-di2-fgsm"}
        assert entry["training_seconds"] > 0
        assert re.search(rf"^{method} +1\b.* 16 +\d+\.\d ±\d+\.\d ", stdout, re.M), method
    dverge = doc["defenses"]["dverge"]
    assert dverge["init_from"]["run"] == str(out / "baseline")
    assert dverge["training_seconds_total"] == pytest.approx(
        dverge["training_seconds"] + doc["defenses"]["baseline"]["training_seconds"])
    assert doc["protocol"]["transfer"]["attacks"][0]["params"]["steps"] == 100  # the DVERGE authors' PGD


def test_the_surrogate_is_a_separate_baseline_and_not_a_defense(digits_league):
    out, doc, _, _, _ = digits_league
    assert SURROGATE not in doc["defenses"]
    surrogate = doc["surrogate"]
    assert surrogate["run"] == str(out / SURROGATE) and surrogate["method"] == "baseline"
    assert surrogate["seed"] != doc["config"]["seed"]
    assert all(e["run"] != surrogate["run"] for e in doc["defenses"].values())
    transfer_set = doc["protocol"]["transfer"]["transfer_set"]
    assert transfer_set.startswith(str(out / "transfer"))
    assert json.loads(open(transfer_set.replace(".safetensors", ".json")).read())["indices"] == list(range(16))


def test_the_report_has_the_table_and_the_figure(digits_league):
    out, doc, _, _, _ = digits_league
    assert (out / "league.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "league.md").read_text()
    assert "](league.png)" in md and "| defense | epochs |" in md
    assert all(f"| {m} |" in md for m in ALL_METHODS) and "eps 0.1" in md and "seed 100" in md


def test_a_second_run_reuses_the_trained_runs(digits_league):
    out, _, _, second, trained = digits_league
    assert _run_files(out) == trained  # no epoch trained again, no checkpoint rewritten
    for label in [*ALL_METHODS, SURROGATE]:
        assert f"[{label}] reusing the trained run" in second


def test_a_bad_method_is_refused_listing_the_allowed_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"methods\[1\] = 'dvrge' is not allowed; expected one of "
                                          r"\['baseline', 'adp', 'gal', 'dverge', 'trs', 'gdr'\]"):
        _league("methods=[baseline, dvrge]")
    out = tmp_path / "league"
    assert main(["league", "league/digits", "--out", str(out), "--set", "methods=[ensadv]"]) == 2
    err = capsys.readouterr().err
    assert "methods[0] = 'ensadv' is not allowed" in err and "'gdr'" in err and not out.exists()


@pytest.mark.parametrize("override, message", [
    ("overrides.gal.train.epochs=30", "overrides.gal = 'train.epochs' is not allowed; expected a key the league"),
    ("overrides.all.model.arch=resnet20", "overrides.all = 'model.arch'"),
    ("overrides.ensadv.method.eps=0.3", r"overrides = 'ensadv' is not allowed"),
    ("surrogate_seed=0", "surrogate_seed = 0 is not allowed; expected a seed other than the defenses'"),
    ("members=1", "members = 1"),
    ("start_from_baseline=[baseline]", r"start_from_baseline\[0\] = 'baseline'"),
    ("presets.gal=quickstart/baseline", "presets.gal = 'quickstart/baseline' is not allowed: it trains 'baseline"),
    ("overrides.gal.method.gal_lamda=1", "the gal run of the league .*gal_lamda"),
    ("bogus=1", "unknown key 'bogus'"),
])
def test_bad_league_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        league_runs(_league(override), "unused")


def test_every_run_gets_the_league_budget_and_data(tmp_path):
    cfg = _league("epochs=4", "data.train_subset=100", "overrides.gal.method.gal_lambda=1.5")
    runs = league_runs(cfg, tmp_path)
    assert list(runs) == [*ALL_METHODS, SURROGATE]
    for label, (cfg, run_dir) in runs.items():
        assert run_dir == tmp_path / label and cfg.train.epochs == 4 and cfg.data.train_subset == 100
        assert (cfg.model.arch, cfg.model.members, cfg.data.dataset) == ("conv", 3, "digits")
        assert cfg.seed == (100 if label == SURROGATE else 0)
    assert runs["trs"][0].method["delta_epochs"] == 4  # TRS's delta ramp spans the run (the TRS authors')
    assert runs["gal"][0].method == {"gal_lambda": 1.5, "noise_eps": 0.3}
    assert runs["dverge"][0].train.init_from == str(tmp_path / "baseline")
    only = league_runs(_league("methods=[dverge]"), tmp_path)
    assert list(only) == ["baseline", "dverge", SURROGATE]  # the baseline DVERGE starts from is trained


def test_a_step_schedule_keeps_its_place_in_a_shorter_budget(tmp_path):
    cfg = load_league_config(resolve_config_path("league/cifar10-conv"), ["epochs=60"])
    trs = league_runs(cfg, tmp_path)["trs"][0]
    assert trs.optim.milestones == (21, 41) and trs.method["delta_epochs"] == 60  # 41, 81 of 120 epochs


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("league/")])
def test_every_league_preset_builds_its_runs(name, tmp_path):
    cfg = load_league_config(resolve_config_path(name))
    runs = league_runs(cfg, tmp_path)
    assert list(runs)[-1] == SURROGATE and set(cfg.methods) <= set(runs)


def test_a_changed_league_refuses_the_old_runs_before_writing(tmp_path, capsys, digits_league):
    out = digits_league[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["league", "league/digits", "--out", str(out), "--quiet", *TINY, "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "the league's baseline run" in err and "another configuration" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_foreign_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["league", "league/digits", "--out", str(tmp_path), "--quiet", *TINY]) == 2
    assert "not a league's folder (it holds notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
