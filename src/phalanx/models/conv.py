"""Plain convolutional classifiers: the DVERGE report's seed Conv and the GAL paper's Conv-3/Conv-4."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.errors import UsageError
from phalanx.models.base import Activation, Classifier, InputSpec, make_activation


class StagedClassifier(Classifier):
    """A chain of named stages, each a body (pre-activation) followed by the activation.

    The final stage (the logits) has no activation. A body that starts with max pooling gets
    its input pooled before the previous stage's activation is applied: ReLU and leaky ReLU
    are non-decreasing, so they commute with max pooling (same values, same gradients), and
    activating after the pool touches 4x fewer elements (the seed Conv's distillation step:
    measured in benchmarks/RESULTS.md).
    """

    stackable: ClassVar[bool] = True  # every op acts per channel or per example (models/stacked.py)

    def __init__(self, spec: InputSpec, stages: list[tuple[str, nn.Module]], activation: Activation | str):
        super().__init__(spec)
        self.layer_names = tuple(name for name, _ in stages)
        self.stages = nn.ModuleDict(stages)
        self.act = make_activation(activation)

    def _run(self, z: torch.Tensor, stop_at: str | None, pre_activation: bool) -> torch.Tensor:
        last = self.layer_names[-1]
        activate = False  # z is the previous stage's pre-activation, still to be activated
        for name, body in self.stages.items():
            if not activate:
                z = body(z)
            elif isinstance(body, nn.Sequential) and isinstance(body[0], nn.MaxPool2d):
                z = self.act(body[0](z))
                for module in list(body)[1:]:
                    z = module(z)
            else:
                z = body(self.act(z))
            if name == last or (name == stop_at and pre_activation):
                return z
            if name == stop_at:
                return self.act(z)
            activate = True
        raise AssertionError("unreachable: the last stage returns")


class NormalizingConv2d(nn.Conv2d):
    """An unpadded convolution of raw [0, 1] pixels with the input normalization folded in.

    conv(W, (x - mean) / std) + b = conv(W / std, x) + b - sum(W * mean / std), exactly, when the
    convolution has no padding (a padded border would be zero after normalization, but not
    after the fold). It saves two elementwise passes over the input, and their backward, in
    every forward: the seed Conv's whole normalization cost. The parameters are the ordinary
    `weight` and `bias` of the convolution on normalized inputs, so checkpoints are unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, spec: InputSpec):
        super().__init__(in_channels, out_channels, kernel_size)
        self.register_buffer("in_mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the same convolution applied to raw pixels."""
        weight = self.weight / self.in_std
        return weight, self.bias - (weight * self.in_mean).sum(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return F.conv2d(x, weight, bias)


def _flat_size(spec: InputSpec, trunk: nn.Module) -> int:
    with torch.no_grad():
        return int(trunk(torch.zeros(1, spec.channels, spec.size, spec.size)).numel())


class SeedConv(StagedClassifier):
    """The DVERGE report's `Conv`: two 5x5 convolutions with max pooling, then FC 120-84-classes.

    The classic LeNet-style CIFAR network (conv 6 and 16 channels). Inputs smaller than 16 px
    would vanish under two unpadded 5x5 convolutions, so they are refused.
    """

    # 3- to 16-channel layers: one grouped kernel beats M small ones on a CPU (benchmarks/RESULTS.md)
    prefers_stacking: ClassVar[bool] = True
    input_conv: ClassVar[str | None] = "stages.conv1"

    def __init__(self, spec: InputSpec, activation: Activation | str = Activation.RELU):
        if spec.size < 16:
            raise UsageError(f"seed Conv needs images of at least 16x16 pixels, got {spec.size}x{spec.size}")
        conv1 = NormalizingConv2d(spec.channels, 6, 5, spec)
        conv2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 16, 5))
        flat = _flat_size(spec, nn.Sequential(conv1, conv2, nn.MaxPool2d(2)))
        stages = [
            ("conv1", conv1),
            ("conv2", conv2),
            ("fc1", nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, 120))),
            ("fc2", nn.Linear(120, 84)),
            ("logits", nn.Linear(84, spec.num_classes)),
        ]
        super().__init__(spec, stages, activation)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x  # conv1 normalizes (NormalizingConv2d)


def _conv3x3(cin: int, cout: int, pool_first: bool) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    return nn.Sequential(nn.MaxPool2d(2), conv) if pool_first else conv


class ConvNet(StagedClassifier):
    """The GAL paper's Conv-k networks (Table 1): 3x3 convolutions, 2x2 max pooling, FC1024.

    `widths` lists the conv channels; `pool_after` the indices of convs followed by pooling.
    """

    input_conv: ClassVar[str | None] = "stages.conv1"

    def __init__(
        self,
        spec: InputSpec,
        widths: tuple[int, ...],
        pool_after: tuple[int, ...],
        activation: Activation | str = Activation.LEAKY_RELU,
    ):
        stages: list[tuple[str, nn.Module]] = []
        cin = spec.channels
        for i, width in enumerate(widths):
            stages.append((f"conv{i + 1}", _conv3x3(cin, width, pool_first=(i - 1) in pool_after)))
            cin = width
        trunk = nn.Sequential(*(body for _, body in stages), nn.MaxPool2d(2))
        flat = _flat_size(spec, trunk)
        stages.append(("fc1", nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, 1024))))
        stages.append(("logits", nn.Linear(1024, spec.num_classes)))
        super().__init__(spec, stages, activation)


def conv3(spec: InputSpec, activation: Activation | str = Activation.LEAKY_RELU) -> ConvNet:
    """Conv-3: C32-C64-M-C128-M-FC1024-FC10."""
    return ConvNet(spec, (32, 64, 128), pool_after=(1, 2), activation=activation)


def conv4(spec: InputSpec, activation: Activation | str = Activation.LEAKY_RELU) -> ConvNet:
    """Conv-4: C32-C64-C128-M-C128-M-FC1024-FC10."""
    return ConvNet(spec, (32, 64, 128, 128), pool_after=(2, 3), activation=activation)
