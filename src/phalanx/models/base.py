"""What every phalanx classifier offers: pixels in [0, 1] in, logits out, named feature taps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import nn

from phalanx.errors import UsageError


class Activation(str, Enum):
    """The non-linearities a model may use (the GAL paper requires leaky ReLU, section 3.4)."""

    RELU = "relu"
    LEAKY_RELU = "leaky_relu"


# Negative slope 0.1, as in the DVERGE authors' models/resnet.py (leaky_relu=True).
LEAKY_SLOPE = 0.1


def make_activation(activation: Activation | str) -> nn.Module:
    """One activation module; never in-place so that pre-activation taps stay intact."""
    activation = Activation(activation)
    if activation is Activation.RELU:
        return nn.ReLU()
    return nn.LeakyReLU(LEAKY_SLOPE)


@dataclass(frozen=True)
class InputSpec:
    """Shape and statistics of the images a model is built for."""

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    def raw_pixels(self) -> InputSpec:
        """The same shape with mean 0 and std 1: a model built for it sees pixels in [0, 1] as they are."""
        return dataclasses.replace(self, mean=(0.0,) * self.channels, std=(1.0,) * self.channels)


class Classifier(nn.Module):
    """Base class: normalizes inside `forward` and exposes named intermediate features.

    Subclasses implement `_run(z, stop_at, pre_activation)`, which runs the network on the
    normalized input and returns early at the layer `stop_at` (or the logits when None).
    """

    layer_names: tuple[str, ...] = ()
    # True when the forward uses only modules that phalanx.models.stacked knows how to stack
    # and otherwise acts per channel or per example, so that several members can run as one
    stackable: ClassVar[bool] = False
    # True when running members stacked was measured faster than one call per member
    # (benchmarks/RESULTS.md); methods that can stack use it as their default
    prefers_stacking: ClassVar[bool] = False
    # The name of the convolution that alone reads the normalized input, if there is one: stacked
    # members given one batch for all (an ensemble's forward) run it once with all their kernels
    input_conv: ClassVar[str | None] = None

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.normalize(x), None, False)

    def features(self, x: torch.Tensor, layer: str, *, pre_activation: bool = True) -> torch.Tensor:
        """The output of `layer` (one of `layer_names`) for pixels `x`.

        With `pre_activation`, the value before that layer's non-linearity, as the DVERGE
        authors' `get_features(..., before_relu=True)`; the last layer is always the logits.
        """
        if layer not in self.layer_names:
            raise UsageError(f"unknown layer {layer!r}; this model has {list(self.layer_names)}")
        return self._run(self.normalize(x), layer, pre_activation)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the classifier head reads (the penultimate layer after its activation),
        flattened: (batch, features); RRM matches it."""
        return self.features(x, self.layer_names[-2], pre_activation=False).flatten(1)

    def _run(self, z: torch.Tensor, stop_at: str | None, pre_activation: bool) -> torch.Tensor:
        raise NotImplementedError
