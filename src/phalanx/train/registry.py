"""Training methods by name: a plain dict of (config dataclass, method class)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phalanx.config import ConfigError, from_mapping
from phalanx.train.adp import Adp, AdpConfig
from phalanx.train.adversarial import Adversarial, AdversarialConfig
from phalanx.train.api import TrainingMethod
from phalanx.train.baseline import Baseline, BaselineConfig
from phalanx.train.dverge import Dverge, DvergeAdvtConfig, DvergeConfig
from phalanx.train.ensadv import EnsAdv, EnsAdvConfig, EnsAdvGalConfig
from phalanx.train.gal import Gal, GalConfig
from phalanx.train.gdr import Gdr, GdrConfig
from phalanx.train.kd import Kd, KdConfig
from phalanx.train.rrm import Rrm, RrmConfig
from phalanx.train.trs import Trs, TrsConfig

METHODS: dict[str, tuple[type, type]] = {
    "baseline": (BaselineConfig, Baseline),
    "dverge": (DvergeConfig, Dverge),
    "dverge-advt": (DvergeAdvtConfig, Dverge),
    "gal": (GalConfig, Gal),
    "adp": (AdpConfig, Adp),
    "adversarial": (AdversarialConfig, Adversarial),
    "ensadv": (EnsAdvConfig, EnsAdv),
    "ensadv+gal": (EnsAdvGalConfig, EnsAdv),
    "gdr": (GdrConfig, Gdr),
    "trs": (TrsConfig, Trs),
    "rrm": (RrmConfig, Rrm),
    "kd": (KdConfig, Kd),
}


def build_method(name: str, params: Mapping[str, Any]) -> TrainingMethod:
    """The method `name` configured by `params` (validated by its own config dataclass)."""
    if name not in METHODS:
        raise ConfigError(f"train.method = {name!r} is not allowed; expected one of {sorted(METHODS)}")
    config_cls, method_cls = METHODS[name]
    return method_cls(from_mapping(config_cls, params, "method"))
