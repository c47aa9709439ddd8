"""image-folder: root/{train,test}/<class>/ images, decoded once into a verified cache, and its refusals."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import phalanx
from phalanx.cli import main
from phalanx.data import DataCacheWarning, DataError, dataset_info, imagefolder, load_dataset
from phalanx.files import DamagedFileWarning

COUNTS = {"train": {"cat": 3, "dog": 2, "emu": 2}, "test": {"cat": 1, "dog": 2, "emu": 1}}


@pytest.fixture
def folder(datafiles, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "pets"
    return root, datafiles.write_image_folder(root, COUNTS)


def _quiet_load(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good folder and its cache load without any warning
        return load_dataset("image-folder", split, root)


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the images were decoded again")

    monkeypatch.setattr(imagefolder, "_decode_all", refuse)


# --- loading and the spec -------------------------------------------------------------------------

def test_splits_load_with_sorted_classes_and_exact_pixels(folder) -> None:
    root, expected = folder
    for split in ("train", "test"):
        x, y = _quiet_load(split, root)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (len(y), 3, 16, 16)
        assert np.array_equal(x.numpy(), expected[split][0]) and np.array_equal(y.numpy(), expected[split][1])
    assert y.tolist() == [0, 1, 1, 2]


def test_spec_comes_from_the_training_images(folder) -> None:
    root, expected = folder
    info = dataset_info("image-folder", root)
    pixels = expected["train"][0].astype(np.float64) / 255
    assert info.class_names == ("cat", "dog", "emu") and info.display_name == "pets (image folder)"
    assert (info.spec.channels, info.spec.size, info.spec.num_classes) == (3, 16, 3)
    assert np.allclose(info.spec.mean, pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(info.spec.std, pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert dataset_info("image-folder", str(root)) == info  # strings too, and the same answer twice


def test_grayscale_folders_have_one_channel(datafiles, tmp_path: Path) -> None:
    expected = datafiles.write_image_folder(tmp_path, COUNTS, mode="L")
    x, _ = _quiet_load("test", tmp_path)
    assert x.shape == (4, 1, 16, 16) and np.array_equal(x.numpy(), expected["test"][0])
    assert dataset_info("image-folder", tmp_path).spec.channels == 1


def test_a_grayscale_image_among_colour_ones_is_converted_to_rgb(datafiles, tmp_path: Path) -> None:
    expected = datafiles.write_image_folder(tmp_path, COUNTS)
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "train" / "cat" / "000.png")
    x, _ = _quiet_load("train", tmp_path)
    assert np.array_equal(x[0].numpy(), np.stack([gray] * 3))
    assert np.array_equal(x[1:].numpy(), expected["train"][0][1:])


def test_jpeg_files_in_any_case_decode_as_pillow_does(datafiles, tmp_path: Path) -> None:
    datafiles.write_image_folder(tmp_path, COUNTS, suffix=".JPEG")
    (tmp_path / "train" / "cat" / "000.JPEG").rename(tmp_path / "train" / "cat" / "000.jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    x, y = _quiet_load("train", tmp_path)
    with Image.open(tmp_path / "train" / "cat" / "000.jpg") as image:
        assert np.array_equal(x[0].numpy(), np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    assert len(y) == 7


def test_a_train_only_folder_loads_train_and_refuses_test(datafiles, tmp_path: Path) -> None:
    datafiles.write_image_folder(tmp_path, {"train": COUNTS["train"]})
    assert _quiet_load("train", tmp_path)[0].shape == (7, 3, 16, 16)
    with pytest.raises(DataError, match=rf"{tmp_path} has no test/ folder; image-folder's test split is"):
        load_dataset("image-folder", "test", tmp_path)


# --- refusals ------------------------------------------------------------------------------------

def _save(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("damage, message", [
    (lambda r: _save(r / "test" / "dog" / "001.png", np.zeros((16, 12, 3), np.uint8)),
     r"test/dog/001.png: 12x16 pixels, but .*train/cat/000.png \(the first training image\) is 16x16; "
     r"every image must have the same size \(image-folder never resizes\)"),
    (lambda r: [_save(p, np.zeros((16, 20, 3), np.uint8)) for p in r.glob("*/*/*.png")],
     r"train/cat/000.png: 20x16 pixels; image-folder needs square images"),
    (lambda r: (r / "train" / "dog" / "001.png").write_bytes(b"not an image at all"),
     r"train/dog/001.png: not a readable PNG or JPEG image \(UnidentifiedImageError"),
    (lambda r: _truncate(r / "train" / "dog" / "001.png", 300),
     r"train/dog/001.png: not a readable PNG or JPEG image \(OSError: .*truncated"),
    (lambda r: Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(r / "train" / "dog" / "001.png", "GIF"),
     r"train/dog/001.png: not a readable PNG or JPEG image"),
    (lambda r: Image.fromarray(np.zeros((16, 16), np.uint16)).save(r / "train" / "emu" / "000.png"),
     r"train/emu/000.png: pixel mode 'I;16' \(16-bit or floating-point\); image-folder reads 8-bit images"),
    (lambda r: (r / "test" / "dog").rename(r / "test" / "wolf"),
     r"test lacks dog and has wolf not in train/; test/ must hold the same class folders as train/ \(3\)"),
    (lambda r: [p.unlink() for p in (r / "train" / "emu").iterdir()],
     r"train/emu holds no .png/.jpg/.jpeg image$"),
    (lambda r: [p.rename(p.parent / "images" / p.name) for p in _nested(r / "train" / "emu")],
     r"train/emu holds no .png/.jpg/.jpeg image; images must sit directly in it, "
     r"not in subfolders \(images/\)"),
    (lambda r: [os.rename(r / "train" / c, r / "train" / f".{c}") for c in ("dog", "emu")],
     r"train has 1 class folder\(s\) \(cat\); image-folder needs at least 2"),
], ids=["odd-size", "not-square", "not-an-image", "truncated-png", "gif", "16-bit", "test-classes",
        "empty-class", "nested-images", "one-class"])
def test_bad_folders_are_refused_naming_the_file_and_leaving_nothing_behind(folder, damage, message) -> None:
    root, _ = folder
    damage(root)
    for call in (lambda: load_dataset("image-folder", "train", root),
                 lambda: dataset_info("image-folder", root)):
        with pytest.raises(DataError, match=message):
            call()
    assert not (root / imagefolder.CACHE_DIR).exists()


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _nested(folder: Path) -> list[Path]:
    (folder / "images").mkdir()
    return [p for p in folder.iterdir() if p.is_file()]


def test_a_colour_test_image_in_a_grayscale_set_is_refused(datafiles, tmp_path: Path) -> None:
    datafiles.write_image_folder(tmp_path, COUNTS, mode="L")
    _save(tmp_path / "test" / "emu" / "000.png", np.zeros((16, 16, 3), np.uint8))
    message = r"test/emu/000.png: a colour image \(mode 'RGB'\), but every training image is grayscale"
    with pytest.raises(DataError, match=message):
        load_dataset("image-folder", "train", tmp_path)


@pytest.mark.parametrize("root, kwargs, message", [
    (None, {}, r"image-folder needs a root \(data.root\): the folder that holds train/<class>/"),
    ("missing", {}, r"image-folder root .*missing is not a folder"),
    ("", {}, r"has no train/ folder; image-folder expects .*/train/<class>/\*.png\|jpg\|jpeg"),
    ("", {"download": True}, r"image-folder cannot be downloaded"),
])
def test_bad_roots_are_refused(tmp_path: Path, root, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_dataset("image-folder", "train", None if root is None else tmp_path / root, **kwargs)
    if not kwargs:
        with pytest.raises(DataError, match=message):
            dataset_info("image-folder", None if root is None else tmp_path / root)


# --- the cache -----------------------------------------------------------------------------------

def test_the_cache_is_plain_arrays_and_a_sealed_record(folder, monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected = folder
    _quiet_load("train", root)
    cache = root / imagefolder.CACHE_DIR
    assert sorted(p.name for p in cache.iterdir()) == ["cache.json", "test.npz", "train.npz"]
    with np.load(cache / "test.npz", allow_pickle=False) as npz:  # no object arrays: nothing to unpickle
        assert sorted(npz.files) == ["images", "labels"]
        assert np.array_equal(npz["images"], expected["test"][0])
    record = json.loads((cache / "cache.json").read_text())
    assert record["classes"] == ["cat", "dog", "emu"] and record["mode"] == "RGB" and record["size"] == 16
    assert {s: e["count"] for s, e in record["splits"].items()} == {"train": 7, "test": 4}
    assert "sha256" in record and len(record["splits"]["train"]["sha256"]) == 64

    _no_decoding(monkeypatch)  # from now on only the cache is read
    x, y = _quiet_load("test", root)
    assert np.array_equal(x.numpy(), expected["test"][0]) and np.array_equal(y.numpy(), expected["test"][1])
    assert dataset_info("image-folder", root).spec.size == 16


@pytest.mark.parametrize("change", ["added", "removed", "rewritten", "renamed-class"])
def test_a_changed_folder_rebuilds_the_cache_silently(folder, change: str) -> None:
    root, expected = folder
    _quiet_load("train", root)
    new = np.full((16, 16, 3), 7, np.uint8)
    if change == "added":
        _save(root / "train" / "dog" / "zzz.png", new)
    elif change == "removed":
        (root / "train" / "cat" / "002.png").unlink()
    elif change == "rewritten":  # same name, new content (and mtime)
        _save(root / "train" / "cat" / "000.png", new)
        os.utime(root / "train" / "cat" / "000.png", ns=(1, 1))
    else:
        for split in ("train", "test"):
            (root / split / "cat").rename(root / split / "zebra")
    x, y = _quiet_load("train", root)
    counts = {"added": 8, "removed": 6, "rewritten": 7, "renamed-class": 7}
    assert len(y) == counts[change]
    if change == "rewritten":
        assert np.array_equal(x[0].numpy(), new.transpose(2, 0, 1))
    if change == "renamed-class":
        assert dataset_info("image-folder", root).class_names == ("dog", "emu", "zebra")
        assert y.tolist() == [0, 0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("damage, message", [
    (lambda c: _flip_byte(c / "train.npz"), r"train.npz is damaged: its SHA-256 does not match cache.json"),
    (lambda c: (c / "train.npz").unlink(), r"train.npz is missing though cache.json lists it"),
    (lambda c: (c / "cache.json").write_text((c / "cache.json").read_text().replace('"RGB"', '"L"')),
     r"cache.json is damaged: its content does not match its sha256"),
    (lambda c: (c / "cache.json").write_text("{not json"), r"cache.json is damaged: not a JSON document"),
], ids=["npz-flipped-byte", "npz-missing", "sidecar-edited", "sidecar-not-json"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(folder, damage, message) -> None:
    root, expected = folder
    _quiet_load("train", root)
    damage(root / imagefolder.CACHE_DIR)
    expected_warning = rf"image-folder cache: .*{message}.*decoding the images again"
    with pytest.warns(DamagedFileWarning, match=expected_warning):
        x, y = load_dataset("image-folder", "train", root)
    assert np.array_equal(x.numpy(), expected["train"][0]) and np.array_equal(y.numpy(), expected["train"][1])
    _quiet_load("train", root)  # rebuilt: quiet again


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(folder,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected = folder

    def no_space(path: object, data: object) -> None:
        raise OSError(28, f"could not write {path} (No space left on device); nothing was written")

    monkeypatch.setattr(imagefolder, "write_bytes_atomic", no_space)
    with pytest.warns(DataCacheWarning, match=r"could not write .*No space left.*decoded again next time"):
        x, _ = load_dataset("image-folder", "test", root)
    assert np.array_equal(x.numpy(), expected["test"][0])
    _no_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = dataset_info("image-folder", root)  # remembered in this process: not decoded again
    assert info.spec.num_classes == 3 and not (root / imagefolder.CACHE_DIR / "cache.json").exists()


# --- through the CLI and a trained run -------------------------------------------------------------

def _train_argv(root: Path | None, out: Path) -> list[str]:
    data = [] if root is None else ["--set", f"data.root={root}"]
    return ["train", "quickstart/baseline", "--out", str(out), "--set", "data.dataset=image-folder", *data,
            "--set", "model.members=2", "--set", "train.epochs=1", "--set", "train.batch_size=4",
            "--set", "device=cpu", "--quiet"]


def test_a_run_on_an_image_folder_trains_and_loads_with_the_folders_spec(folder, tmp_path: Path) -> None:
    root, _ = folder
    assert main(_train_argv(root, tmp_path / "run")) == 0
    mixture = phalanx.load_run(tmp_path / "run")
    spec = dataset_info("image-folder", root).spec
    assert all(m.spec == spec for m in mixture.members)
    x, _ = load_dataset("image-folder", "test", root)
    assert mixture(x.float() / 255).shape == (4, 3)


@pytest.mark.parametrize("case", ["no-root", "odd-size"])
def test_a_refused_image_folder_fails_in_one_line_and_writes_no_run(folder, tmp_path: Path, capsys,
                                                                    case: str) -> None:
    root, _ = folder
    if case == "odd-size":
        _save(root / "train" / "dog" / "001.png", np.zeros((8, 8, 3), np.uint8))
    assert main(_train_argv(None if case == "no-root" else root, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phalanx: error: "), err
    assert ("needs a root" if case == "no-root" else "001.png: 8x8 pixels") in err[0]
    assert not (tmp_path / "run").exists()
