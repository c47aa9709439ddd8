"""The toy setting the method tests share: seed-Conv members for the embedded digits (16x16 grey,
10 classes), small enough to train a step in milliseconds and seeded so every test is repeatable."""

from __future__ import annotations

import torch

from phalanx.data import dataset_info
from phalanx.models import Classifier, build_model

DIGITS = dataset_info("digits").spec


def digit_members(n: int, activation: str | None = None, seed: int = 0, arch: str = "conv") -> list[Classifier]:
    """`n` members in train mode, member i initialised from torch seed `seed * 100 + i`."""
    out = []
    for i in range(n):
        torch.manual_seed(seed * 100 + i)
        out.append(build_model(arch, DIGITS, activation).train())
    return out
