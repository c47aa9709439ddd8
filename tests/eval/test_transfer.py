"""The transfer protocol on tiny real runs: craft on a surrogate, store, reuse, evaluate a target."""

from __future__ import annotations

import json

import pytest
import torch

from phalanx.attacks import AttackSpec
from phalanx.attacks.core import Loss, input_gradient, per_example_loss
from phalanx.config import load_config
from phalanx.eval import transfer
from phalanx.eval.stats import wilson_interval
from phalanx.eval.tables import paired_eps_table
from phalanx.eval.transfer import (
    GAL_TRANSFER_ATTACKS,
    AverageLossSurrogate,
    craft_transfer_set,
    evaluate_transfer,
    load_transfer_set,
)
from phalanx.runs import load_members
from phalanx.train.loop import train

TINY = ["data.dataset=digits", "data.train_subset=256", "model.members=2", "train.epochs=1",
        "train.batch_size=64", "device=cpu", "optim.name=adam", "optim.lr=0.003"]
ATTACKS = [AttackSpec("fgsm", 0.1), AttackSpec("i-fgsm", 0.1, {"steps": 3}),
           AttackSpec("pgd-cw", 0.1, {"steps": 3}), AttackSpec("fgsm", 0.3),
           AttackSpec("i-fgsm", 0.3, {"steps": 3})]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    surrogate = train(load_config(None, [*TINY, "seed=0"]), root / "surrogate", progress=False)
    target = train(load_config(None, [*TINY, "seed=1"]), root / "target", progress=False)
    return surrogate, target


@pytest.fixture(scope="module")
def crafted(runs, tmp_path_factory):
    surrogate, _ = runs
    out = tmp_path_factory.mktemp("sets")
    path = craft_transfer_set([surrogate], ATTACKS, examples=48, seed=3, out_path=out, batch_size=32,
                              device="cpu", command="phalanx eval target --transfer-from surrogate")
    return path


def test_average_loss_surrogate_has_the_members_mean_loss_and_its_gradient(runs):
    members, _, _ = load_members(runs[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 16, 16, generator=g), torch.randint(0, 10, (5,), generator=g)
    for loss in (Loss.CE, Loss.CW):
        surrogate = AverageLossSurrogate(members, y, loss)
        mean = torch.stack([per_example_loss(m(x), y, loss) for m in members]).mean(0)
        assert torch.allclose(per_example_loss(surrogate(x), y, loss), mean, atol=1e-5)
    x_req = x.clone().requires_grad_(True)
    torch.stack([per_example_loss(m(x_req), y, Loss.CE) for m in members]).mean(0).sum().backward()
    got = input_gradient(AverageLossSurrogate(members, y, Loss.CE), x, y, loss=Loss.CE, targeted=False)
    assert torch.allclose(got, x_req.grad, rtol=1e-4, atol=1e-7)


def test_a_crafted_set_holds_float32_examples_in_the_ball_and_a_full_sidecar(crafted, runs):
    tensors, meta = load_transfer_set(crafted)
    assert crafted.name.startswith("transfer-") and crafted.name.endswith(".safetensors")
    assert meta["command"] == "phalanx eval target --transfer-from surrogate"
    assert meta["surrogate_runs"] == [str(runs[0])] and meta["dataset"] == "digits" and meta["seed"] == 3
    assert meta["n"] == 48 and len(meta["indices"]) == 48 and meta["indices"] == sorted(meta["indices"])
    assert meta["surrogate_loss"] == "average" and meta["dtype"] == "float32"
    assert [(a["attack"], a["eps"]) for a in meta["attacks"]] == [(a.name, a.eps) for a in ATTACKS]
    assert meta["attacks"][2]["params"]["kappa"] == 50.0
    assert torch.equal(tensors["indices"], torch.tensor(meta["indices"]))
    for key, desc in meta["tensors"].items():
        adv = tensors[key]
        assert adv.dtype == torch.float32 and adv.shape == tensors["x"].shape
        assert float((adv - tensors["x"]).abs().max()) <= desc["eps"] + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_the_same_request_reuses_the_set_without_attacking(crafted, runs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("attacked again")

    monkeypatch.setattr(transfer, "run_attack", refuse)
    again = craft_transfer_set([runs[0]], ATTACKS, examples=48, seed=3, out_path=crafted.parent, batch_size=16,
                               device="cpu", command="another command")
    assert again == crafted
    with pytest.raises(AssertionError, match="attacked again"):
        craft_transfer_set([runs[0]], ATTACKS, examples=48, seed=4, out_path=crafted.parent, device="cpu")


def test_evaluate_transfer_writes_records_with_the_strongest_row(crafted, runs):
    target = runs[1]
    doc = evaluate_transfer(target, crafted, device="cpu")
    on_disk = json.loads((target / "eval" / "transfer.json").read_text())
    assert on_disk["results"] == doc["results"] and doc["source"] == "transfer:surrogate"
    recs = doc["results"]
    assert {r["model"] for r in recs} == {"member1", "member2", "mixture"}
    assert all(r["source"] == "transfer:surrogate" and r["n"] == 48 and "warnings" in r for r in recs)
    for model in ("member1", "member2", "mixture"):
        for eps in (0.1, 0.3):
            rows = [r for r in recs if r["model"] == model and r["eps"] == eps]
            (strongest,) = [r for r in rows if r["attack"] == "strongest"]
            assert strongest["accuracy"] <= min(r["accuracy"] for r in rows if r["attack"] != "strongest")
    clean = next(r for r in recs if r["model"] == "mixture" and r["attack"] == "clean")
    worst = next(r for r in recs if r["model"] == "mixture" and r["attack"] == "strongest" and r["eps"] == 0.3)
    assert worst["accuracy"] < clean["accuracy"]  # the examples transfer (1-epoch runs: weak, but real)
    assert "sanity" in doc and set(doc["sanity"]["checks"]) >= {"monotone-in-eps", "budget"}
    for r in recs:  # every record carries its 95% Wilson interval, around its accuracy
        assert r["ci95"] == list(wilson_interval(round(r["accuracy"] * 48), 48))
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert on_disk["results"][0]["ci95"] == recs[0]["ci95"]
    header, rows = paired_eps_table(recs)
    assert header[:4] == ["model", "n", "clean", "fgsm (0.1 / 0.3)"] and " / " in rows[0][3]
    assert rows[0][1] == "48" and " ±" in rows[0][2]


def test_transfer_refuses_attacks_it_cannot_average_and_mixed_datasets(runs, tmp_path):
    with pytest.raises(ValueError, match="cannot attack an average-loss surrogate"):
        craft_transfer_set([runs[0]], [AttackSpec("apgd-dlr", 0.1)], examples=4, seed=0, out_path=tmp_path)
    with pytest.raises(ValueError, match="at least one surrogate"):
        craft_transfer_set([], ATTACKS, examples=4, seed=0, out_path=tmp_path)


@pytest.mark.parametrize("name, surrogate_loss", [
    ("fgsm", Loss.CE), ("pgd-cw", Loss.CW), ("square", Loss.CW), ("apgd-dlr", None), ("apgd-dlr-l2", None),
    ("apgd-t", None)])
def test_the_surrogate_averages_the_loss_the_registry_entry_states(name, surrogate_loss, monkeypatch):
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)) for _ in range(2)]
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    if surrogate_loss is None:
        with pytest.raises(ValueError, match=f"{name}' cannot attack an average-loss surrogate.*dlr loss"):
            transfer.craft_on_surrogate(members, x, y, [AttackSpec(name, 0.1)], seed=0)
        return
    seen = []
    monkeypatch.setattr(transfer, "run_attack", lambda spec, model, xb, *_: seen.append(model.loss) or xb)
    transfer.craft_on_surrogate(members, x, y, [AttackSpec(name, 0.1)], seed=0)
    assert seen == [surrogate_loss]


def test_gal_presets_are_table_2():
    for dataset, eps in (("cifar10", (0.03, 0.09)), ("mnist", (0.1, 0.3))):
        names = [(a.name, a.eps) for a in GAL_TRANSFER_ATTACKS[dataset]]
        assert names == [(n, e) for e in eps for n in ("fgsm", "r-fgsm", "i-fgsm", "mi-fgsm", "pgd-cw")]
