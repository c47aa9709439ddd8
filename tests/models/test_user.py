"""A user's own nn.Module as a member: taps by module path, factories named in YAML, mixed ensembles."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
from torch import nn

from phalanx.config import ConfigError, load_config
from phalanx.models import InputSpec
from phalanx.models.user import ModelFactoryError, ModuleMember, discover_layers, import_factory
from phalanx.runs import build_members, load_members, load_run, read_metrics
from phalanx.train.loop import train

DIGITS = InputSpec(1, 16, 10, (0.3054,), (0.3760,))


class SmallNet(nn.Module):
    """A model phalanx does not know: two convolutions, a nested block, a linear head."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).flatten(1))


def small_net(width: int = 4) -> nn.Module:
    return SmallNet(width)


def rgb_net() -> nn.Module:
    """A model for colour images: refused on the one-channel digits."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))


FACTORY = f"{__name__}:SmallNet"


def test_layers_are_discovered_in_call_order_and_end_with_the_logits():
    assert discover_layers(SmallNet(), DIGITS) == ("stem", "block.1", "logits")


def test_a_tap_is_the_output_of_the_module_at_that_path():
    torch.manual_seed(0)
    net = SmallNet()
    member = ModuleMember(net, DIGITS)
    x = torch.rand(3, 1, 16, 16)
    z = (x - 0.3054) / 0.3760
    assert torch.allclose(member.features(x, "stem"), net.stem(z))
    assert torch.allclose(member.features(x, "block.1"), net.block[1](net.block[0](net.stem(z))))
    assert torch.allclose(member.features(x, "logits"), member(x))
    assert torch.allclose(member(x), net(z))
    # the penultimate representation is what the head reads
    assert torch.allclose(member.penultimate(x), net.block(net.stem(z)).flatten(1))
    with pytest.raises(ValueError, match="unknown layer 'head'"):
        member.features(x, "head")


def test_explicit_layers_are_checked_against_the_module_tree():
    assert ModuleMember(SmallNet(), DIGITS, ["block.1"]).layer_names == ("block.1", "logits")
    with pytest.raises(ModelFactoryError, match="'block.9' is not a module of SmallNet"):
        ModuleMember(SmallNet(), DIGITS, ["block.9"])


def test_a_module_with_the_wrong_output_is_refused_with_the_shape_it_needs():
    with pytest.raises(ModelFactoryError, match=r"returns \(2, 7\).*\(batch, 10\)"):
        ModuleMember(SmallNet(num_classes=7), DIGITS)


@pytest.mark.parametrize(("path", "message"), [
    ("no_colon", "expected 'package.module:callable'"),
    ("phalanx_no_such_module:f", "cannot be imported"),
    (f"{__name__}:NoSuchNet", "has no attribute 'NoSuchNet'"),
    (f"{__name__}:DIGITS", "not a callable"),
])
def test_a_factory_that_cannot_be_used_is_refused_by_name(path, message):
    with pytest.raises(ModelFactoryError, match=message):
        import_factory(path)


def test_config_refuses_inconsistent_model_sections():
    with pytest.raises(ConfigError, match="kwargs and model.layers only with model.factory"):
        load_config(None, ["model.kwargs={width: 2}"])
    with pytest.raises(ConfigError, match="exactly one of arch"):
        load_config(None, ["model.members=[{arch: conv, factory: 'a:b'}]"])
    with pytest.raises(ConfigError, match="model.factory = 'not a path'"):
        load_config(None, ["model.factory=not a path"])


def _digits(tmp_path, extra):
    return load_config(None, ["data.dataset=digits", "data.train_subset=96", "train.batch_size=32",
                              "train.epochs=1", "device=cpu", "eval.examples=32", *extra])


def test_dverge_trains_a_user_model_named_in_yaml_then_it_reloads_and_evaluates(tmp_path):
    from phalanx.eval.run_eval import evaluate_run

    cfg = _digits(tmp_path, [f"model.factory={FACTORY}", "model.kwargs={width: 3}", "train.method=dverge",
                             "method.distill.steps=2"])
    run = train(cfg, tmp_path / "run", progress=False)
    (record,) = read_metrics(run)
    drawn = record["layer"] if isinstance(record["layer"], list) else [record["layer"]]
    assert set(drawn) <= {"stem", "block.1", "logits"}  # a tap of the user's model, drawn for the epoch
    members, _, _ = load_members(run)
    assert all(isinstance(m, ModuleMember) and m.module.stem.out_channels == 3 for m in members)
    fresh = build_members(cfg, DIGITS)[0]  # the same seeded initialisation, untrained
    assert not torch.equal(fresh.module.stem.weight, members[0].module.stem.weight)  # reloaded: the trained weights
    doc = evaluate_run(run, examples=32)
    assert doc["arch"] == FACTORY
    assert {r["model"] for r in doc["results"]} >= {"member1", "mixture"}


def test_a_run_whose_factory_can_no_longer_be_imported_is_refused_clearly(tmp_path, monkeypatch):
    package = tmp_path / "userpkg_phalanx_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny():
            return nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _digits(tmp_path, ["model.factory=userpkg_phalanx_test.nets:tiny", "model.members=2"])
    run = train(cfg, tmp_path / "run", progress=False)
    assert len(load_run(run).members) == 2
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith("userpkg_phalanx_test")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModelFactoryError, match="'userpkg_phalanx_test.nets:tiny' cannot be imported"):
        load_run(run)


def test_a_mixed_ensemble_of_three_architectures_trains_with_dverge_and_gal_and_evaluates(tmp_path):
    from phalanx.eval.run_eval import evaluate_run

    mix = f"model.members=[{{arch: conv}}, {{arch: resnet20}}, {{factory: '{FACTORY}', kwargs: {{width: 2}}}}]"
    for method in (["train.method=dverge", "method.distill.steps=1"], ["train.method=gal"]):
        cfg = _digits(tmp_path, [mix, *method])
        assert cfg.model.label == f"conv+resnet20+{FACTORY}"
        run = train(cfg, tmp_path / method[0].split("=")[1], progress=False)
        members = load_run(run).members
        assert [type(m).__name__ for m in members] == ["SeedConv", "ResNet", "ModuleMember"]
        doc = evaluate_run(run, examples=16)
        assert doc["arch"] == cfg.model.label
        assert sum(r["model"] == "mixture" for r in doc["results"]) >= 1


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.factory=phalanx_no_such_pkg.nets:net"], "cannot be imported"),
    ([f"model.factory={__name__}:NoSuchNet"], "has no attribute 'NoSuchNet'"),
    ([f"model.factory={FACTORY}", "model.kwargs={depth: 3}"], "refused model.kwargs"),
    ([f"model.factory={__name__}:rgb_net"], r"fails on a batch of 2 images of shape \(1, 16, 16\)"),
    ([f"model.factory={__name__}:small_net", "model.kwargs={width: 2}", "model.layers=[nope]"],
     r"layer 'nope' is not a module of SmallNet"),
])
def test_a_bad_factory_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, overrides, message):
    from phalanx.cli import main

    out = tmp_path / "run"
    sets = [a for o in ["data.dataset=digits", "train.epochs=1", *overrides] for a in ("--set", o)]
    assert main(["train", "quickstart/baseline", *sets, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not out.exists()

