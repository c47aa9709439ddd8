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
    from phalanx.attacks import AttackSpec

    old = AttackSpec.from_mapping({"name": "fgsm", "eps": 0.03, "random_start": True, "restarts": 1})
    assert old == AttackSpec.from_mapping({"name": "fgsm", "eps": 0.03}) == AttackSpec("fgsm", 0.03)
    assert AttackSpec.from_mapping({"name": "pgd-linf", "eps": 0.03, "alpha": 0.007, "steps": 10,
                                    "random_start": True, "restarts": 1}) == \
        AttackSpec.from_mapping({"name": "pgd-linf", "eps": 0.03, "alpha": 0.007})
    kept = AttackSpec.from_mapping({"name": "pgd-linf", "eps": 0.03, "steps": 20})
    assert kept.params["steps"] == 20  # a real change is kept


def test_attack_values_outside_their_range_are_refused():
    import pytest

    from phalanx.attacks import AttackSpec
    from phalanx.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval.attacks\[\].eps = 2.0 is not allowed; expected a number in \[0, 1\]"):
        AttackSpec.from_mapping({"name": "pgd-linf", "eps": 2.0})
    assert AttackSpec.from_mapping({"name": "pgd-l2", "eps": 2.0}).eps == 2.0  # an L2 budget may exceed 1
    with pytest.raises(ConfigError, match=r"only parameters fgsm takes"):
        AttackSpec.from_mapping({"name": "fgsm", "eps": 0.1, "steps": 5})
    with pytest.raises(ConfigError, match="eval.attacks\\[\\].name = 'deepfool'"):
        AttackSpec.from_mapping({"name": "deepfool", "eps": 0.1})
    with pytest.raises(ConfigError, match=r"eval.attacks\[0\] = \{'name': 'fgsm'\} is not allowed"):
        load_config(None, ["eval.attacks=[{name: fgsm}]"])


def test_eval_attacks_keep_their_mapping_form_and_fingerprints_stay_those_of_the_runs_made():
    """`eval.attacks` entries are AttackSpecs written as the flat mapping run configs have always held;
    fingerprints (cited by results/) are those computed before AttackSpec replaced AttackConfig."""
    from phalanx.config import fingerprint, to_mapping

    cfg = load_config(None)
    assert to_mapping(cfg)["eval"]["attacks"][1] == {"name": "pgd-linf", "eps": 0.03, "alpha": 0.007,
                                                     "steps": None, "random_start": None, "restarts": None}
    assert fingerprint(cfg) == "db322df3a67853a078b50e21230e46c870bb73e09f370667e6b903755cf18746"
    pinned = {
        "dverge-report/table1-vanilla": "8629476207b91e2e1546904fafc9c2eea1d1c6fb70d7be56e760e776bc3ba97c",
        "gal-paper/table2-conv3-mnist": "ad85faa3f36565e742bcee3d53fe2257207fbf86cc9c41b8ab42c696cfc6b401"}
    for name, value in pinned.items():
        assert fingerprint(load_config(resolve_config_path(name))) == value, name
