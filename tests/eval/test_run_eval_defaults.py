"""`phalanx eval RUN --attack NAME --eps E` with no other flag runs NAME with its registry defaults
scaled to E, and whitebox.json records the parameters actually used (one case per attack)."""

from __future__ import annotations

import json

import pytest

from phalanx.attacks import ATTACKS, AttackName, AttackSpec
from phalanx.cli import main
from phalanx.config import load_config
from phalanx.train.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config(None, ["data.dataset=digits", "model.members=2", "train.epochs=1", "train.batch_size=64",
                             "device=cpu"])
    return train(cfg, tmp_path_factory.mktemp("defaults") / "run", progress=False)


@pytest.mark.parametrize("name", list(AttackName), ids=[n.value for n in AttackName])
def test_an_attack_named_alone_runs_with_its_own_defaults_and_records_them(name, run_dir, capsys):
    # large budgets: every attack fools the 1-epoch run quickly, so query-based ones stop early
    eps = 3.0 if name.value.endswith("l2") else 0.3
    if name is AttackName.SGM:  # skip-gradient needs residual blocks: refused, by name, on a Conv run
        assert main(["eval", str(run_dir), "--attack", name.value, "--eps", str(eps), "--examples", "4"]) == 2
        assert "SGM needs a ResNet surrogate" in capsys.readouterr().err
        return
    assert main(["eval", str(run_dir), "--attack", name.value, "--eps", str(eps), "--examples", "4", "--quiet"]) == 0
    doc = json.loads((run_dir / "eval" / "whitebox.json").read_text())
    (record,) = [r for r in doc["results"] if r["model"] == "mixture" and r["attack"] == name.value]
    expected = AttackSpec(name, eps).resolved_params()
    assert record["params"] == expected and record["eps"] == eps
    if "alpha" in ATTACKS[name].derived and "steps" in expected:  # a step scaled to eps, taken `steps` times
        assert expected["alpha"] * expected["steps"] >= eps  # the default step reaches the budget
    if "steps" in ATTACKS[name].tunable() and name.value.startswith("apgd"):
        assert record["params"]["steps"] == 100  # APGD's own 100 iterations, never a CLI default
    members = [r for r in doc["results"] if r["model"] != "mixture" and r["attack"] == name.value]
    assert len(members) == (0 if ATTACKS[name].ensemble_only else 2)


def test_a_step_flag_no_named_attack_takes_is_refused(run_dir, capsys):
    assert main(["eval", str(run_dir), "--attack", "fgsm", "--steps", "5"]) == 2
    assert "--steps 5 is not taken by fgsm" in capsys.readouterr().err


def test_an_unreachable_budget_is_a_sanity_warning(run_dir):
    assert main(["eval", str(run_dir), "--attack", "pgd-linf", "--eps", "0.1", "--alpha", "0.007",
                 "--steps", "10", "--examples", "4", "--quiet"]) == 0
    doc = json.loads((run_dir / "eval" / "whitebox.json").read_text())
    assert not doc["sanity"]["checks"]["reachable-budget"]["passed"]
    assert any("reach only 0.07 < eps" in w for r in doc["results"] for w in r["warnings"])
