"""The training split a run trains on and the set it validates on, from `data.*` settings.

One place decides it for datasets read from disk and for tensors given to the Python API:
the first `train_subset` images, then `val_size` of them held out (a seeded random draw, or the
first ones with `val_from: head`), or, without a hold-out, the test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from phalanx.config import DataConfig
from phalanx.data.batching import train_val_split
from phalanx.data.loading import LoadedSplit, load_split


@dataclass
class SplitData:
    """uint8 training and validation images with their labels; `val_source` says where the
    validation set comes from ("train-holdout" or "test"); `copy` which copy of the dataset the
    images are (`LoadedSplit.copy`: None for the canonical files)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_source: str
    copy: str | None = None


def split_training_data(x: torch.Tensor, y: torch.Tensor, data: DataConfig, seed: int,
                        test: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> SplitData:
    """The split of training images `x`, `y` that `data` asks for; `test()` gives the test split
    when no hold-out is asked for (called only then)."""
    if data.train_subset is not None:
        x, y = x[: data.train_subset], y[: data.train_subset]
    if data.val_size > 0:
        tx, ty, vx, vy = train_val_split(x, y, data.val_size, seed, head=data.val_from == "head")
        return SplitData(tx, ty, vx, vy, "train-holdout")
    vx, vy = test()
    return SplitData(x, y, vx, vy, "test")


def load_training_data(data: DataConfig, seed: int) -> SplitData:
    """The split of `data.dataset` read from disk (checked as every load is); `copy` is the
    training files' (`LoadedSplit.copy`)."""
    def load(split: str) -> LoadedSplit:
        return load_split(data.dataset, split, data.root, download=data.download,
                          allow_noncanonical=data.allow_noncanonical)

    def test() -> tuple[torch.Tensor, torch.Tensor]:
        loaded = load("test")
        return loaded.images, loaded.labels

    train = load("train")
    return replace(split_training_data(train.images, train.labels, data, seed, test), copy=train.copy)
