"""CIFAR ResNets (He et al. 2016) of depth 6n+2: ResNet-20 (n=3) and ResNet-26 (n=4).

Layout and feature taps follow the DVERGE authors' models/resnet.py: a 3x3 stem with batch
norm, three stages of basic blocks (16, 32, 64 channels), 1x1-conv shortcuts where the shape
changes, global average pooling and a linear layer. Each convolution is a tap, so ResNet-20
has 1 + 18 + 1 = 20 layers, the DVERGE `depth`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from phalanx.errors import UsageError
from phalanx.models.base import Activation, Classifier, InputSpec, make_activation


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: Activation | str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor, stop: str | None = None, pre_activation: bool = False) -> torch.Tensor:
        """Run the block; `stop="mid"` returns after the first convolution."""
        out = self.bn1(self.conv1(x))
        if stop == "mid" and pre_activation:
            return out
        out = self.act(out)
        if stop == "mid":
            return out
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        if stop == "out" and pre_activation:
            return out
        return self.act(out)


class ResNet(Classifier):
    """CIFAR ResNet of depth 6n+2 with taps `stem`, `s{stage}b{block}.mid`, `s{stage}b{block}.out`, `logits`."""

    stackable: ClassVar[bool] = True  # every op acts per channel or per example (models/stacked.py)
    input_conv: ClassVar[str | None] = "stem.0"

    def __init__(self, spec: InputSpec, depth: int = 20, activation: Activation | str = Activation.RELU):
        if depth < 8 or (depth - 2) % 6:
            raise UsageError(f"ResNet depth must be 6n+2 with n >= 1 (20, 26, 32, ...), got {depth}")
        super().__init__(spec)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(spec.channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.act = make_activation(activation)
        blocks: dict[str, BasicBlock] = {}
        cin = 16
        for stage, width in enumerate((16, 32, 64), start=1):
            for b in range(1, n + 1):
                stride = 2 if (stage > 1 and b == 1) else 1
                blocks[f"s{stage}b{b}"] = BasicBlock(cin, width, stride, activation)
                cin = width
        self.blocks = nn.ModuleDict(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, spec.num_classes)
        names = ["stem"]
        for key in blocks:
            names += [f"{key}.mid", f"{key}.out"]
        self.layer_names = (*names, "logits")
        for m in self.modules():  # He initialization, as the DVERGE authors' resnet.py
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def _run(self, z: torch.Tensor, stop_at: str | None, pre_activation: bool) -> torch.Tensor:
        z = self.stem(z)
        if stop_at == "stem" and pre_activation:
            return z
        z = self.act(z)
        if stop_at == "stem":
            return z
        for key, block in self.blocks.items():
            if stop_at is not None and stop_at.startswith(key + "."):
                return block(z, stop_at.split(".")[1], pre_activation)
            z = block(z)
        return self.fc(self.flatten(self.pool(z)))
