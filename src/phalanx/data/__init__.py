"""Datasets (digits, MNIST, Fashion-MNIST, CIFAR-10/100, SVHN, image folders), checksummed loading,
on-device batching."""

from __future__ import annotations

from phalanx.data.batching import Augment, DeviceBatches, train_val_split
from phalanx.data.errors import DataCacheWarning, DataError, NoncanonicalDataWarning
from phalanx.data.loading import LoadedSplit, default_root, load_dataset, load_split
from phalanx.data.registry import DatasetInfo, DatasetName, dataset_info, display_name

__all__ = [
    "Augment", "DataCacheWarning", "DataError", "DatasetInfo", "DatasetName", "DeviceBatches", "LoadedSplit",
    "NoncanonicalDataWarning", "dataset_info", "default_root", "display_name", "load_dataset", "load_split",
    "train_val_split",
]
