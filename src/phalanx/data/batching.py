"""On-device batching: the whole split lives on the training device as uint8; batches and
augmentation (random crop, flip, noise) are batched tensor ops there. No worker processes.

Randomness is stateless: the permutation of epoch `e` comes from a generator seeded with
(seed, e, stream), and the augmentation of batch `b` from one seeded with (seed, e, stream, b).
So the same seed gives the same batches, and resuming needs only (epoch, batch) — which
`state_dict()` records and `epoch(e, start_batch=b)` accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from phalanx.data.errors import DataError

NOISE_KINDS = ("gaussian", "truncated")
# The truncated normal is cut at 2 standard deviations, as TensorFlow's truncated_normal, which the
# GAL paper's setup names ("truncated normal distribution"; the authors used TensorFlow/Cleverhans).
TRUNCATE_AT = 2.0


def truncated_normal(shape: torch.Size | tuple[int, ...], *, std: float, generator: torch.Generator,
                     dtype: torch.dtype = torch.float32, bound: float = TRUNCATE_AT) -> torch.Tensor:
    """Samples of N(0, std^2) truncated to [-bound * std, bound * std], drawn on the generator's device.

    Exact inverse-CDF sampling: u uniform between Phi(-bound) and Phi(bound), then Phi^-1(u).
    The one truncated-normal sampler of phalanx: `Augment`'s truncated noise, GAL's noisy copy
    and EnsAdv's per-example FGSM radii.
    """
    lo = torch.special.ndtr(torch.tensor(-bound, dtype=torch.float64)).item()
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    z = torch.special.ndtri(lo + (1 - 2 * lo) * u).clamp(-bound, bound)
    return (z * std).to(dtype)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, applied per example on the device.

    crop_padding: pad with zeros by this many pixels on each side, then crop back at a random offset.
    flip: mirror left-right with probability 1/2.
    noise_std: add noise of this standard deviation (pixel units), then clamp to [0, 1].
    noise: "gaussian", or "truncated" (normal truncated at 2 std, as the GAL paper's training noise).
    """

    crop_padding: int = 0
    flip: bool = False
    noise_std: float = 0.0
    noise: Literal["gaussian", "truncated"] = "gaussian"

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise DataError(f"Augment crop_padding={self.crop_padding!r}; must be an int >= 0")
        if not self.noise_std >= 0:
            raise DataError(f"Augment noise_std={self.noise_std!r}; must be >= 0")
        if self.noise not in NOISE_KINDS:
            raise DataError(f"Augment noise={self.noise!r}; allowed: {', '.join(map(repr, NOISE_KINDS))}")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.noise_std > 0

    def __call__(self, x_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Float images in [0, 1] from a uint8 batch (B, C, H, W); all randomness drawn from `generator`."""
        b, _, h, w = x_u8.shape
        dev = x_u8.device
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x_u8, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            rows = (dy + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx + torch.arange(w, device=dev))[:, None, None, :]
            batch = torch.arange(b, device=dev)[:, None, None, None]
            chans = torch.arange(x_u8.shape[1], device=dev)[None, :, None, None]
            x_u8 = padded[batch, chans, rows, cols]
        if self.flip:
            mirror = torch.rand(b, device=dev, generator=generator) < 0.5
            x_u8 = torch.where(mirror[:, None, None, None], x_u8.flip(3), x_u8)
        x = x_u8.float().div_(255)
        if self.noise_std:
            if self.noise == "truncated":
                z = truncated_normal(x.shape, std=1.0, generator=generator, dtype=x.dtype).to(dev)
            else:
                z = torch.empty_like(x).normal_(generator=generator)
            x = x.add_(z, alpha=self.noise_std).clamp_(0, 1)
        return x


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints, statistically independent for distinct tuples."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DeviceBatches:
    """Shuffled, optionally augmented float batches of a uint8 split held on `device`.

    `for x, y in batches.epoch(e)` gives x float32 (B, C, H, W) in [0, 1] and y int64 (B,);
    `batches.epoch_pairs(e)` gives (x, y, x_s, y_s), the second from an independent permutation
    (DVERGE's source batch). `len(batches)` is the number of batches per epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 device: torch.device | str = "cpu", shuffle: bool = True, augment: Augment | None = None,
                 seed: int = 0, drop_last: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels of shape {tuple(labels.shape)} do not match {images.shape[0]} images")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r}; must be an int >= 1")
        if drop_last and batch_size > images.shape[0]:
            raise DataError(f"batch_size={batch_size} with drop_last leaves no batch of "
                            f"{images.shape[0]} examples; "
                            f"use at most {images.shape[0]}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.seed = int(seed)
        self.drop_last = drop_last
        self._epoch, self._batch = 0, 0

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, epoch: int, stream: int = 0) -> torch.Tensor:
        """The example order of `epoch` (drawn on the CPU so it is the same on every device)."""
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        gen = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, stream))
        return torch.randperm(n, generator=gen).to(self.device)

    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`, from batch `start_batch` on (to resume mid-epoch)."""
        for b, (x, y) in self._stream(epoch, 0, start_batch):
            self._epoch, self._batch = epoch, b + 1
            yield x, y

    def epoch_pairs(self, epoch: int, *, start_batch: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, x_s, y_s) per step: two batches from independent permutations of the split."""
        first, second = self._stream(epoch, 0, start_batch), self._stream(epoch, 1, start_batch)
        for (b, (x, y)), (_, (xs, ys)) in zip(first, second):
            self._epoch, self._batch = epoch, b + 1
            yield x, y, xs, ys

    def _stream(self, epoch: int, stream: int, start_batch: int
                ) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        if not 0 <= start_batch <= len(self):
            raise DataError(f"start_batch={start_batch}; allowed 0..{len(self)}")
        order = self.permutation(epoch, stream)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x_u8, y = self.images[idx], self.labels[idx]
            if self.augment is None:
                x = x_u8.float().div_(255)
            else:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(_derive_seed(self.seed, epoch, stream, b))
                x = self.augment(x_u8, gen)
            yield b, (x, y)

    def state_dict(self) -> dict[str, int]:
        """Where iteration stands: the seed, and the epoch and batch to continue from."""
        return {"seed": self.seed, "epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore `state_dict()`; continue with `epoch(state["epoch"], start_batch=state["batch"])`."""
        missing = {"seed", "epoch", "batch"} - set(state)
        if missing:
            raise DataError(f"DeviceBatches state is missing {sorted(missing)}; "
                            "expected keys seed, epoch, batch")
        self.seed, self._epoch, self._batch = int(state["seed"]), int(state["epoch"]), int(state["batch"])


def train_val_split(images: torch.Tensor, labels: torch.Tensor, val_size: int | float, seed: int, *,
                    head: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, val_images, val_labels): a seeded random hold-out, order kept,
    or with `head` the first `val_size` images (the split of the DVERGE report's code).

    `val_size` is a count (int >= 1) or a fraction in (0, 1); both parts must be non-empty.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise DataError(f"{labels.shape[0]} labels for {n} images; they must match")
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError(f"val_size={val_size!r}; must be an int count or a float fraction in (0, 1)")
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise DataError(f"val_size={val_size!r}; a fraction must be in (0, 1)")
        count = round(val_size * n)
    else:
        count = val_size
    if not 0 < count < n:
        raise DataError(f"val_size={val_size!r} gives {count} of {n} examples for validation; "
                        f"need between 1 and {n - 1}")
    gen = torch.Generator().manual_seed(_derive_seed(seed, 0x5EED))
    order = torch.arange(n) if head else torch.randperm(n, generator=gen)
    val_idx, train_idx = order[:count].sort().values, order[count:].sort().values
    val_idx, train_idx = val_idx.to(images.device), train_idx.to(images.device)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]
