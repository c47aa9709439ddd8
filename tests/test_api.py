"""The Python API: user objects in, the CLI's documents out, a run directory only when asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import phalanx
from phalanx.data import DataError, load_dataset


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


@pytest.fixture(scope="module")
def digits() -> phalanx.TensorData:
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    return phalanx.TensorData(x[:256].float() / 255, y[:256], xt[:64], yt[:64])


QUICK = {"train.epochs": 2, "train.batch_size": 32, "optim.name": "adam", "optim.lr": 0.003, "device": "cpu"}


def test_dverge_on_tensors_trains_the_modules_in_place_and_writes_nothing(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    nets = [TinyNet() for _ in range(2)]
    before = nets[0].conv.weight.detach().clone()
    result = phalanx.train("quickstart/dverge", members=nets, data=digits,
                           overrides={**QUICK, "method.distill.steps": 2, "train.diagnostics_every": 0})
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert {r["layer"] for r in result.metrics} <= {"conv", "logits"}  # DVERGE's draw over TinyNet's taps
    assert result.members[0].module is nets[0] and not torch.equal(before, nets[0].conv.weight)
    assert result.config["data"]["dataset"] == "tensors"
    # no run directory, and the temporary one is gone (torch may keep a cache folder of its own)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")] == []
    doc = phalanx.evaluate(nets, digits, eps=0.1, examples=32, suites=["ensemble"])
    clean = {r["model"]: r["accuracy"] for r in doc["results"] if r["attack"] == "clean"}
    assert clean["mixture"] > 0.3 and doc["sanity"]["passed"]


def test_a_run_directory_is_written_when_asked_and_reloads(digits, tmp_path):
    out = tmp_path / "run"
    result = phalanx.train("quickstart/gal", members=[TinyNet(), TinyNet()], data=digits,
                           overrides={**QUICK, "train.epochs": 1}, out=out)
    assert result.run_dir == out and (out / "config.yaml").is_file()
    mixture = phalanx.load_run(out)  # rebuilt through the class's import path, no arguments
    x = digits.x_test[:8].float() / 255
    assert torch.allclose(mixture(x), result.ensemble(x), atol=1e-6)
    with pytest.raises(DataError, match="trained on tensors passed in Python"):
        phalanx.evaluate(out)  # its test data are not on disk
    doc = phalanx.evaluate(out, digits, eps=0.1, examples=16, suites=["ensemble"])
    assert doc["run"] == str(out)


def test_transfer_between_module_ensembles_reports_the_worst_case(digits):
    surrogate = phalanx.train(members=[TinyNet(), TinyNet()], data=digits, overrides=QUICK).members
    target = phalanx.train(members=[TinyNet(), TinyNet()], data=digits, overrides={**QUICK, "seed": 5}).members
    doc = phalanx.transfer(surrogate, target, (digits.x_test, digits.y_test), examples=32,
                           attacks=[{"name": "fgsm", "eps": 0.1}, {"name": "i-fgsm", "eps": 0.1, "steps": 5}])
    worst = [r for r in doc["results"] if r["model"] == "mixture" and r["attack"] == "strongest"]
    each = [r["accuracy"] for r in doc["results"] if r["model"] == "mixture" and r["attack"] in ("fgsm", "i-fgsm")]
    assert len(worst) == 1 and worst[0]["accuracy"] <= min(each)


def test_report_writes_markdown_and_html(digits, tmp_path):
    out = tmp_path / "run"
    phalanx.train(members=[TinyNet(), TinyNet()], data=digits, overrides={**QUICK, "train.epochs": 1}, out=out)
    paths = phalanx.report([out], tmp_path / "report")
    assert paths["markdown"].read_text().startswith("# ") and paths["html"].is_file()


def test_bad_data_is_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="uint8 .* or floating point in \\[0, 1\\]"):
        phalanx.TensorData(torch.full((2, 1, 4, 4), 2.0), torch.zeros(2, dtype=torch.long),
                           torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one per image"):
        phalanx.TensorData(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long),
                           torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty sequence of torch.nn.Module"):
        phalanx.train(members=["not a module"], data="digits")
