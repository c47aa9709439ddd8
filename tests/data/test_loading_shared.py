"""The real files in ../shared/data (next to the repository), when that folder exists."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from phalanx.data import DataError, NoncanonicalDataWarning, display_name, load_dataset, load_split

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")]


def test_shared_mnist_is_canonical_and_cifar10_is_the_jpeg_decoded_copy() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # canonical files: no warning at all
        x, y = load_dataset("mnist", "train", SHARED)
    assert tuple(x.shape) == (60000, 1, 28, 28) and y.bincount().tolist()[1] == 6742

    with pytest.raises(DataError, match="JPEG-decoded copy"):
        load_dataset("cifar10", "test", SHARED)
    with pytest.warns(NoncanonicalDataWarning, match="JPEG-decoded copy"):
        loaded = load_split("cifar10", "test", SHARED, allow_noncanonical=True)
    x, y = loaded.images, loaded.labels
    assert loaded.copy == "JPEG-decoded copy"
    assert display_name("cifar10", SHARED, loaded.copy) == "CIFAR-10 (JPEG-decoded copy)"
    assert load_split("mnist", "test", SHARED).copy is None
    assert tuple(x.shape) == (10000, 3, 32, 32) and y.bincount().tolist() == [1000] * 10
