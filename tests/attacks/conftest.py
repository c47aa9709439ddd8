"""The fixtures of the attack tests on the small task of attack_table.py (a module may define its own)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phalanx.models import Mixture
from tests.attacks.attack_table import eval_set, train_mixture, train_net


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """The undefended conv net trained from seed 0, in eval mode (a copy per module)."""
    return train_net(0)


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 held-out examples (x in [0, 1], y)."""
    return eval_set()


@pytest.fixture(scope="module")
def mixture() -> Mixture:
    """A Mixture of the conv nets trained from seeds 1 and 2."""
    return train_mixture()
