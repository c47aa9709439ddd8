import json
import re

import pytest

from phalanx.cli import main

TINY = ["--set", "data.train_subset=128", "--set", "model.members=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=64", "--set", "device=cpu", "--set", "eval.examples=64"]


def test_train_then_eval_prints_the_table_and_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), "--quiet", *TINY]) == 0
    assert main(["eval", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "member1" in out and "mixture" in out and "pgd-linf 0.1" in out
    doc = json.loads((run / "eval" / "whitebox.json").read_text())
    models = {r["model"] for r in doc["results"]}
    assert models == {"member1", "member2", "mixture"}
    for r in doc["results"]:
        assert {"accuracy", "n", "params", "source", "seed", "wall_time_s", "eps"} <= r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 64
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]  # its 95% Wilson interval
    assert re.search(r"^model +n +clean", out, re.M) and re.search(r"^mixture +64 +\d+\.\d ±\d+\.\d ", out, re.M)


def test_analyze_prints_coherence_and_gaas_tables_and_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), "--quiet", *TINY]) == 0
    capsys.readouterr()
    assert main(["analyze", str(run), "--quiet", "--examples", "30", "--gaas-k", "4", "--gaas-k", "16",
                 "--gaas-eps", "0.2"]) == 0
    out = capsys.readouterr().out
    path = run / "analysis" / "gradients.json"
    doc = json.loads(path.read_text())
    mean = doc["coherence_summary"]["mean"]
    assert "coherence (max pairwise cosine)" in out and re.search(rf"^mean +{mean:.3f}$", out, re.M)
    assert "GAAS of the mixture" in out and "eps 0.2" in out
    assert [(r["k"], r["eps"]) for r in doc["gaas"]["results"]] == [(4, 0.2), (16, 0.2)]
    assert out.rstrip().endswith(str(path)) and doc["n"] == 30
    assert main(["analyze", str(run), "--quiet", "--examples", "10", "--no-gaas"]) == 0
    out = capsys.readouterr().out
    assert "GAAS of the mixture" not in out and "GAAS skipped" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "no/such.yaml"], "neither a file nor a preset"),
    (["train", "quickstart/baseline", "--set", "train.epocs=2"], "unknown key in train 'epocs'"),
    (["train", "quickstart/baseline", "--set", "model.arch=vgg"], "model.arch = 'vgg' is not allowed"),
    (["train", "quickstart/baseline", "--set", "data.dataset=imagenet"], "imagenet"),
    (["eval", "not-a-run"], "not a phalanx run directory"),
    (["analyze", "not-a-run"], "not a phalanx run directory"),
])
def test_usage_errors_exit_2_with_one_clear_line(tmp_path, capsys, argv, message):
    argv = [a.replace("not-a-run", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phalanx: error:") and message in err and len(err.splitlines()) == 1


def test_bad_attack_name_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "x", "--attack", "deepfool"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_eval_examples_all_takes_the_whole_test_split(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart/baseline", "--out", str(run), "--quiet", *TINY]) == 0  # eval.examples=64
    for given, n in (("all", 360), ("10", 10)):  # the embedded digits' test split has 360 images
        assert main(["eval", str(run), "--quiet", "--examples", given, "--attack", "fgsm", "--eps", "0.1"]) == 0
        doc = json.loads((run / "eval" / "whitebox.json").read_text())
        assert {r["n"] for r in doc["results"]} == {n}
    assert re.search(r"^mixture +10 ", capsys.readouterr().out, re.M)
