"""Datasets (digits, MNIST, Fashion-MNIST, CIFAR-10/100, SVHN, image folders), checksummed loading,
on-device batching."""

from __future__ import annotations

from phalanx.data.batching import Augment, DeviceBatches, train_val_split
from phalanx.data.errors import DataCacheWarning, DataError, NoncanonicalDataWarning
from phalanx.data.loading import default_root, load_dataset
from phalanx.data.registry import DatasetInfo, DatasetName, dataset_info

__all__ = [
    "Augment", "DataCacheWarning", "DataError", "DatasetInfo", "DatasetName", "DeviceBatches",
    "NoncanonicalDataWarning", "dataset_info", "default_root", "load_dataset", "train_val_split",
]
