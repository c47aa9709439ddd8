"""DeviceBatches, Augment and train_val_split: coverage, reproducibility, resume, augmentation properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phalanx.data import Augment, DataError, DeviceBatches, train_val_split


def _data(n: int = 50, c: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n)


def _collect(stream) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in item) for item in stream]


def test_an_epoch_covers_every_example_once_as_float_batches() -> None:
    x, y = _data()
    batches = DeviceBatches(x, y, 16, seed=3)
    assert len(batches) == 4
    out = _collect(batches.epoch(0))
    assert [len(b[1]) for b in out] == [16, 16, 16, 2]
    labels = torch.cat([b[1] for b in out])
    assert sorted(labels.tolist()) == list(range(50)) and labels.tolist() != list(range(50))
    for xb, yb in out:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(xb, x[yb].float() / 255)  # labels are indices: images follow their labels
    assert len(DeviceBatches(x, y, 16, drop_last=True)) == 3
    assert [len(b[1]) for b in DeviceBatches(x, y, 16, drop_last=True).epoch(0)] == [16, 16, 16]
    unshuffled = torch.cat([b[1] for b in DeviceBatches(x, y, 16, shuffle=False).epoch(5)])
    assert unshuffled.tolist() == list(range(50))


def test_same_seed_same_batches_and_epochs_differ() -> None:
    x, y = _data()
    aug = Augment(crop_padding=2, flip=True, noise_std=0.1)
    a = _collect(DeviceBatches(x, y, 16, augment=aug, seed=7).epoch(2))
    b = _collect(DeviceBatches(x, y, 16, augment=aug, seed=7).epoch(2))
    assert all(torch.equal(p, q) for pa, pb in zip(a, b) for p, q in zip(pa, pb))
    other_epoch = _collect(DeviceBatches(x, y, 16, augment=aug, seed=7).epoch(3))
    other_seed = _collect(DeviceBatches(x, y, 16, augment=aug, seed=8).epoch(2))
    assert not torch.equal(a[0][1], other_epoch[0][1]) and not torch.equal(a[0][1], other_seed[0][1])


def test_resume_mid_epoch_from_state_dict_gives_the_remaining_batches() -> None:
    x, y = _data()
    aug = Augment(crop_padding=1, flip=True, noise_std=0.05, noise="truncated")
    full = _collect(DeviceBatches(x, y, 8, augment=aug, seed=1).epoch(4))
    first = DeviceBatches(x, y, 8, augment=aug, seed=1)
    stream = first.epoch(4)
    for _ in range(3):
        next(stream)
    state = first.state_dict()
    assert state == {"seed": 1, "epoch": 4, "batch": 3}
    resumed = DeviceBatches(x, y, 8, augment=aug, seed=999)
    resumed.load_state_dict(state)
    rest = _collect(resumed.epoch(state["epoch"], start_batch=state["batch"]))
    assert len(rest) == len(full) - 3
    assert all(torch.equal(p, q) for pa, pb in zip(full[3:], rest) for p, q in zip(pa, pb))
    with pytest.raises(DataError, match="start_batch=99; allowed 0..7"):
        next(resumed.epoch(0, start_batch=99))
    with pytest.raises(DataError, match="missing"):
        resumed.load_state_dict({"seed": 1})


def test_epoch_pairs_draw_two_independent_permutations() -> None:
    x, y = _data()
    batches = DeviceBatches(x, y, 10, seed=0)
    pairs = _collect(batches.epoch_pairs(1))
    assert len(pairs) == len(batches)
    first = torch.cat([p[1] for p in pairs])
    second = torch.cat([p[3] for p in pairs])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert not torch.equal(first, second)
    assert torch.equal(first, torch.cat([b[1] for b in batches.epoch(1)]))  # the first stream is epoch()'s
    for xb, yb, xs, ys in pairs:
        assert torch.equal(xs, x[ys].float() / 255)


def test_flip_is_a_mirror_of_some_examples() -> None:
    x, _ = _data(64)
    out = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    plain, mirrored = x.float() / 255, x.flip(3).float() / 255
    same = (out == plain).flatten(1).all(1)
    flipped = (out == mirrored).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54


def test_crop_keeps_the_shape_and_is_a_window_of_the_zero_padded_image() -> None:
    x, _ = _data(20, size=6)
    p = 2
    out = Augment(crop_padding=p)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = F.pad(x.float() / 255, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6])]
        assert matches, f"example {i} is not a window of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 3


@pytest.mark.parametrize("noise", ["gaussian", "truncated"])
def test_noise_stays_in_the_pixel_range(noise: str) -> None:
    x = torch.full((200, 1, 8, 8), 128, dtype=torch.uint8)
    std = 0.1
    out = Augment(noise_std=std, noise=noise)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and float(out.min()) >= 0 and float(out.max()) <= 1
    delta = out - 128 / 255
    assert abs(float(delta.std()) - std) < (0.02 if noise == "gaussian" else 0.03)
    if noise == "truncated":
        assert float(delta.abs().max()) <= 2 * std + 1e-6
        assert float(delta.std()) < std  # truncation at 2 std shrinks the spread (to about 0.88 std)
    else:
        assert float(delta.abs().max()) > 2 * std
    clamped = Augment(noise_std=1.0)(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.Generator())
    assert float(clamped.min()) == 0 and float(clamped.max()) <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"crop_padding": -1}, "crop_padding=-1"), ({"noise_std": -0.1}, "noise_std=-0.1"),
    ({"noise": "uniform"}, "noise='uniform'; allowed: 'gaussian', 'truncated'"),
])
def test_bad_augment_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Augment(**kwargs)


def test_bad_batch_arguments_are_refused() -> None:
    x, y = _data()
    with pytest.raises(DataError, match="uint8"):
        DeviceBatches(x.float(), y, 4)
    with pytest.raises(DataError, match="batch_size=0"):
        DeviceBatches(x, y, 0)
    with pytest.raises(DataError, match="do not match"):
        DeviceBatches(x, y[:3], 4)


def test_train_val_split_is_deterministic_and_disjoint() -> None:
    x, y = _data(40)
    tx, ty, vx, vy = train_val_split(x, y, 10, seed=0)
    assert (len(ty), len(vy)) == (30, 10)
    assert sorted(ty.tolist() + vy.tolist()) == list(range(40))
    assert ty.tolist() == sorted(ty.tolist())  # original order kept
    assert torch.equal(tx, x[ty]) and torch.equal(vx, x[vy])
    again = train_val_split(x, y, 10, seed=0)
    assert torch.equal(again[3], vy)
    assert not torch.equal(train_val_split(x, y, 10, seed=1)[3], vy)
    assert len(train_val_split(x, y, 0.25, seed=0)[3]) == 10
    for bad in (0, 40, 1.5, 0.0, True):
        with pytest.raises(DataError, match="val_size"):
            train_val_split(x, y, bad, seed=0)
