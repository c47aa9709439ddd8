"""What phalanx knows about each dataset: shape, statistics, class names, files, checksums, mirrors.

Plain declarative entries keyed by `DatasetName`; strings are validated by coercion into the enum.
Checksums are the md5 values published with each dataset (also listed by torchvision's sources).
`image-folder` is the exception: a user's folder of images, whose facts come from the folder
itself (`dataset_info(name, root)`, see `phalanx.data.imagefolder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from phalanx.data.errors import DataError
from phalanx.enums import coerce_enum
from phalanx.models.base import InputSpec


class DatasetName(str, Enum):
    DIGITS = "digits"
    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    SVHN = "svhn"
    IMAGE_FOLDER = "image-folder"


SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. `spec` mean/std are per-channel training statistics in [0, 1] units."""

    name: DatasetName
    display_name: str
    spec: InputSpec
    class_names: tuple[str, ...]


_DIGIT_NAMES = tuple(str(i) for i in range(10))

# The 100 fine labels in the order of `fine_label_names` in CIFAR-100's `meta` (alphabetical).
_CIFAR100_NAMES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm""".split())

_INFOS: dict[DatasetName, DatasetInfo] = {
    # Statistics of the embedded training split (printed by scripts/make_digits.py).
    DatasetName.DIGITS: DatasetInfo(
        DatasetName.DIGITS, "Digits (UCI 8x8, upsampled to 16x16)",
        InputSpec(1, 16, 10, (0.3054,), (0.3760,)), _DIGIT_NAMES),
    DatasetName.MNIST: DatasetInfo(
        DatasetName.MNIST, "MNIST", InputSpec(1, 28, 10, (0.1307,), (0.3081,)), _DIGIT_NAMES),
    DatasetName.FASHION_MNIST: DatasetInfo(
        DatasetName.FASHION_MNIST, "Fashion-MNIST", InputSpec(1, 28, 10, (0.2860,), (0.3530,)),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot")),
    DatasetName.CIFAR10: DatasetInfo(
        DatasetName.CIFAR10, "CIFAR-10",
        InputSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    # The training-set statistics commonly published for CIFAR-100 and SVHN (as used in many
    # training scripts; not computed by phalanx), rounded to 4 decimals like the others.
    DatasetName.CIFAR100: DatasetInfo(
        DatasetName.CIFAR100, "CIFAR-100",
        InputSpec(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), _CIFAR100_NAMES),
    DatasetName.SVHN: DatasetInfo(
        DatasetName.SVHN, "SVHN (cropped digits)",
        InputSpec(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), _DIGIT_NAMES),
}

# Number of examples per split; loaders check files against it (tests patch it for small files).
SPLIT_SIZES: dict[tuple[DatasetName, str], int] = {
    (DatasetName.DIGITS, "train"): 1437, (DatasetName.DIGITS, "test"): 360,
    (DatasetName.MNIST, "train"): 60000, (DatasetName.MNIST, "test"): 10000,
    (DatasetName.FASHION_MNIST, "train"): 60000, (DatasetName.FASHION_MNIST, "test"): 10000,
    (DatasetName.CIFAR10, "train"): 50000, (DatasetName.CIFAR10, "test"): 10000,
    (DatasetName.CIFAR100, "train"): 50000, (DatasetName.CIFAR100, "test"): 10000,
    (DatasetName.SVHN, "train"): 73257, (DatasetName.SVHN, "test"): 26032,
}

# idx files of MNIST and Fashion-MNIST: split -> (images file, labels file).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Canonical md5 of each file, by dataset and file name.
MD5: dict[DatasetName, dict[str, str]] = {
    DatasetName.MNIST: {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    DatasetName.FASHION_MNIST: {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    DatasetName.CIFAR10: {
        "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        # Files of the extracted python version; no per-file md5 is published for the binary version.
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    DatasetName.CIFAR100: {
        "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        # Files of the extracted python version, as for CIFAR-10.
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
    DatasetName.SVHN: {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}

@dataclass(frozen=True)
class KnownCopy:
    """A recognized non-canonical copy of a dataset: what it is (for the loader's warning) and the
    label tables must print beside the dataset's name (never the plain name for a copy)."""

    label: str
    description: str


# Known non-canonical copies, recognized so that the warning and the tables can say what they are.
KNOWN_COPIES: dict[str, KnownCopy] = {
    "2d843e72075d3d03187f04460ebfe762": KnownCopy(
        "JPEG-decoded copy",
        "the JPEG-decoded copy of CIFAR-10 (quality-75 JPEGs decoded back to pixels; canonical order and "
        "labels); report it as 'CIFAR-10 (JPEG-decoded copy)'"),
}

# The label of any other copy: files whose md5 is unknown, or that have no published md5.
UNKNOWN_COPY = "non-canonical copy"


# Where `download=True` fetches each file from, tried in order.
MIRRORS: dict[DatasetName, tuple[str, ...]] = {
    DatasetName.MNIST: ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                        "http://yann.lecun.com/exdb/mnist/"),
    DatasetName.FASHION_MNIST: ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    DatasetName.CIFAR10: ("https://www.cs.toronto.edu/~kriz/",),
    DatasetName.CIFAR100: ("https://www.cs.toronto.edu/~kriz/",),
    DatasetName.SVHN: ("http://ufldl.stanford.edu/housenumbers/",),
}


@dataclass(frozen=True)
class CifarLayout:
    """How a CIFAR dataset's two official versions name their files and store labels.

    Binary records are `label_bytes` label bytes then 3072 pixel bytes (R, G, B planes of 32x32);
    the class label is the last label byte (CIFAR-100's records are coarse, fine). The python
    version's batches are pickled dicts whose labels sit under `label_key`.
    """

    bin_archive: str
    bin_dir: str
    py_archive: str
    py_dir: str
    batches: dict[str, tuple[str, ...]]  # split -> batch names (the binary version adds ".bin")
    label_bytes: int
    label_key: str


CIFAR_LAYOUTS: dict[DatasetName, CifarLayout] = {
    DatasetName.CIFAR10: CifarLayout(
        "cifar-10-binary.tar.gz", "cifar-10-batches-bin", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}, 1, "labels"),
    DatasetName.CIFAR100: CifarLayout(
        "cifar-100-binary.tar.gz", "cifar-100-binary", "cifar-100-python.tar.gz", "cifar-100-python",
        {"train": ("train",), "test": ("test",)}, 2, "fine_labels"),
}

# The official SVHN "format 2" (cropped digits) files, one MATLAB v5 .mat file per split.
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def coerce_name(name: str | DatasetName) -> DatasetName:
    """`name` as a DatasetName, or a DataError listing the known names."""
    if name == "tensors":  # config.TENSOR_DATA
        raise DataError("this run was trained on tensors passed in Python (phalanx.train(data=...)): its data are "
                        "not on disk; evaluate it with phalanx.evaluate(run_dir, data=...) and the test tensors")
    return coerce_enum(DatasetName, name, "dataset", DataError)


def coerce_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(repr(s) for s in SPLITS)}")
    return split


def dataset_info(name: str | DatasetName, root: str | Path | None = None) -> DatasetInfo:
    """Shape, statistics and class names of a dataset; raises DataError for an unknown name.

    `root` matters only for `image-folder`, whose facts are read from the folder (its cache,
    built on first use); the other datasets' entries are fixed and ignore it.
    """
    name = coerce_name(name)
    if name is DatasetName.IMAGE_FOLDER:
        from phalanx.data.imagefolder import folder_info  # it builds on this module

        return folder_info(root)
    return _INFOS[name]


def display_name(name: str | DatasetName, root: str | Path | None = None, copy: str | None = None) -> str:
    """The dataset's name for tables; a copy (`LoadedSplit.copy`) is never called by the plain name."""
    plain = dataset_info(name, root).display_name
    return plain if copy is None else f"{plain} ({copy})"
