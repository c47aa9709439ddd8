import pytest

from phalanx.config import ConfigError, RunConfig, dump_config, from_mapping, load_config
from phalanx.presets import list_presets, resolve_config_path
import yaml


def test_defaults_round_trip_through_yaml():
    cfg = load_config(None, ["train.epochs=3", "optim.milestones=[1, 2]"])
    again = from_mapping(RunConfig, yaml.safe_load(dump_config(cfg)))
    assert again == cfg and cfg.optim.milestones == (1, 2)


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key in train 'epochz'; allowed keys"),
    ("bogus=1", "unknown key 'bogus'"),
    ("train.epochs=0", r"train.epochs = 0 is not allowed; expected an integer >= 1"),
    ("train.epochs=1.5", "expected an integer"),
    ("train.batch_size=0", "batch_size"),
    ("optim.name=rmsprop", r"one of \['sgd', 'adam'\]"),
    ("optim.lr=-1", "optim.lr"),
    ("eval.attacks=[{name: fgsm, eps: -0.1}]", "eps = -0.1 is not allowed"),
    ("eval.attacks=[{name: pgd-linf, eps: 0.1, steps: 0}]", "steps = 0"),
    ("device=tpu", "auto, cpu, cuda"),
    ("train.epochs", "KEY.PATH=VALUE"),
])
def test_bad_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_preset_is_valid():
    from phalanx.league import load_league_config

    names = list_presets()
    assert "quickstart/baseline" in names and "dverge-report/table1-vanilla" in names
    for name in names:
        # a league preset describes several runs (tests/test_league.py builds each of them)
        (load_league_config if name.startswith("league/") else load_config)(resolve_config_path(name))
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        resolve_config_path("no/such-preset")


def test_an_attack_parameter_equal_to_its_default_is_stored_as_not_given():
    """Run configs written before attack parameters defaulted to "not given" (random_start: true,
    restarts: 1 on every attack) still load and compare equal to today's preset."""
    from phalanx.config import AttackConfig

    old = AttackConfig("fgsm", 0.03, random_start=True, restarts=1)
    assert old == AttackConfig("fgsm", 0.03)
    assert AttackConfig("pgd-linf", 0.03, alpha=0.007, steps=10, random_start=True, restarts=1) == \
        AttackConfig("pgd-linf", 0.03, alpha=0.007)
    assert AttackConfig("pgd-linf", 0.03, steps=20).steps == 20  # a real change is kept


def test_attack_values_outside_their_range_are_refused():
    import pytest

    from phalanx.config import AttackConfig, ConfigError

    with pytest.raises(ConfigError, match=r"eval.attacks\[\].eps = 2.0 is not allowed; expected a number in \[0, 1\]"):
        AttackConfig("pgd-linf", 2.0)
    assert AttackConfig("pgd-l2", 2.0).eps == 2.0  # an L2 budget may exceed 1
    with pytest.raises(ConfigError, match=r"only parameters fgsm takes"):
        AttackConfig("fgsm", 0.1, steps=5)
    with pytest.raises(ConfigError, match="eval.attacks\\[\\].name = 'deepfool'"):
        AttackConfig("deepfool", 0.1)
