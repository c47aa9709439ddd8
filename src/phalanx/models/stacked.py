"""Several members of one architecture run as one network: fewer, larger kernels.

Member m's input occupies channels [m*C, (m+1)*C) of a channel-stacked batch (B, M*C, H, W).
Every convolution becomes one grouped convolution, every batch norm one batch norm over the
stacked channels, every linear layer one batched matrix product over (M, B, features); max
pooling, activations and residual additions act per channel, so they run unchanged. For the
seed Conv's 3- to 16-channel layers on a CPU this is more than twice as fast as M separate
calls; for wider layers oneDNN's grouped convolutions are slower than separate ones
(benchmarks/RESULTS.md), which is why callers choose per architecture.

The stack holds no parameters of its own: each forward concatenates the members' current
parameters, so gradients flow back to the members and an optimizer step on them is seen at once.

When every member gets the same input (an ensemble's forward: `shared_logits`), the convolution
that reads the input (`Classifier.input_conv`) runs once on it with all members' kernels as
one ordinary convolution, instead of as a grouped one over M copies of the input.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.models.base import Classifier
from phalanx.models.conv import NormalizingConv2d

# Modules without parameters that act per channel (or per element): they run on stacked
# tensors as they are.
_PER_CHANNEL = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


class _StackedParameters(nn.Module):
    """A stacked layer's parameters, concatenated from the members' at each call, or once while fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.fixed = False
        self._kept: tuple[torch.Tensor | None, ...] | None = None

    def stacked_parameters(self) -> tuple[torch.Tensor | None, ...]:
        if not self.fixed:
            self._kept = None
            return self.concatenate()
        if self._kept is None:
            self._kept = self.concatenate()
        return self._kept

    def concatenate(self) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError


class _StackedConv2d(_StackedParameters):
    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        self.convs = list(convs)  # a plain list: the members own these modules
        self.groups = len(self.convs) * self.convs[0].groups

    def concatenate(self) -> tuple[torch.Tensor | None, ...]:
        pairs = [c.folded() if isinstance(c, NormalizingConv2d) else (c.weight, c.bias) for c in self.convs]
        bias = None if pairs[0][1] is None else torch.cat([b for _, b in pairs])
        return torch.cat([w for w, _ in pairs]), bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weight, bias = self.stacked_parameters()
        c = self.convs[0]
        return F.conv2d(z, weight, bias, c.stride, c.padding, c.dilation, self.groups)


class _StackedInputConv2d(_StackedConv2d):
    """The convolution that alone reads the input: also takes one (B, C, H, W) batch for all members.

    Member m's kernels are output channels [m*C', (m+1)*C') of the concatenated weight, so an
    ungrouped convolution of the shared input gives the channel-stacked output that the grouped
    one gives on M copies of it, without copying the input or summing M input gradients.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.convs[0]
        if z.shape[1] != c.in_channels:  # channel-stacked: M * in_channels
            return super().forward(z)
        weight, bias = self.stacked_parameters()
        return F.conv2d(z, weight, bias, c.stride, c.padding, c.dilation, 1)


class _StackedLinear(_StackedParameters):
    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.linears = list(linears)

    def concatenate(self) -> tuple[torch.Tensor | None, ...]:
        weight_t = torch.stack([lin.weight for lin in self.linears]).transpose(1, 2)
        has_bias = self.linears[0].bias is not None
        return weight_t, torch.stack([lin.bias for lin in self.linears]).unsqueeze(1) if has_bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (M, B, in) -> (M, B, out)
        weight_t, bias = self.stacked_parameters()
        return torch.bmm(z, weight_t) if bias is None else torch.baddbmm(bias, z, weight_t)


class _StackedBatchNorm2d(nn.Module):
    """Per-channel batch norm over stacked channels: each member's statistics, as M calls would.

    Running statistics are updated in a concatenated copy and written back to each member.
    """

    def __init__(self, norms: Sequence[nn.BatchNorm2d]):
        super().__init__()
        self.norms = list(norms)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.norms[0]
        training = first.training
        if any(n.training != training for n in self.norms):
            raise RuntimeError("stacked members must all be in train mode or all in eval mode")
        tracked = first.track_running_stats
        mean = torch.cat([n.running_mean for n in self.norms]) if tracked else None
        var = torch.cat([n.running_var for n in self.norms]) if tracked else None
        weight = torch.cat([n.weight for n in self.norms]) if first.affine else None
        bias = torch.cat([n.bias for n in self.norms]) if first.affine else None
        use_batch_stats = training or not tracked
        out = F.batch_norm(z, mean, var, weight, bias, use_batch_stats, first.momentum, first.eps)
        if training and tracked:
            for n, m, v in zip(self.norms, mean.chunk(len(self.norms)), var.chunk(len(self.norms))):
                n.running_mean.copy_(m)
                n.running_var.copy_(v)
                n.num_batches_tracked.add_(1)
        return out


class _StackedFlatten(nn.Module):
    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, M*C, H, W) -> (M, B, C*H*W)
        return z.unflatten(1, (self.members, -1)).transpose(0, 1).flatten(2)


def _stack_module(name: str, modules: list[nn.Module], *, reads_input: bool) -> nn.Module | None:
    """The stacked replacement of one leaf module of every member, or None when it has none.

    `reads_input`: the module is the members' `input_conv`.
    """
    first = modules[0]
    if isinstance(first, nn.Conv2d):
        if first.padding_mode != "zeros":
            return None
        return _StackedInputConv2d(modules) if reads_input and first.groups == 1 else _StackedConv2d(modules)
    if isinstance(first, nn.Linear):
        return _StackedLinear(modules)
    if isinstance(first, nn.BatchNorm2d):
        return _StackedBatchNorm2d(modules) if first.momentum is not None else None
    if isinstance(first, nn.Flatten):
        return _StackedFlatten(len(modules)) if (first.start_dim, first.end_dim) == (1, -1) else None
    raise AssertionError(f"no stacked form for {name}")


class StackedMembers:
    """M members of one architecture as one network over channel-stacked inputs.

    Build it with `stack_members`; `features` and `logits` take (B, M*C, H, W) built by `stack`.
    Convolutional features come back channel-stacked, (B, M*C', H', W'); linear ones and the
    logits member-major, (M, B, F).
    """

    def __init__(self, members: Sequence[Classifier], net: Classifier):
        self.members = list(members)
        self.channels = members[0].spec.channels
        self._net = net
        self._shares_input = any(isinstance(m, _StackedInputConv2d) for m in net.modules())

    def __len__(self) -> int:
        return len(self.members)

    def stack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One input per member, (B, C, H, W) each, as one (B, M*C, H, W) batch."""
        if len(xs) != len(self.members):
            raise ValueError(f"need one input per member ({len(self.members)}), got {len(xs)}")
        return torch.cat(list(xs), dim=1)

    def unstack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's (B, C, H, W) part of a stacked batch (views)."""
        return list(x.split(self.channels, dim=1))

    @contextlib.contextmanager
    def parameters_fixed(self) -> Iterator[None]:
        """Inside, the members' parameters are concatenated once, not at every call: for loops
        that do not change them (distillation). Changes made inside are not seen until exit."""
        layers = [m for m in self._net.modules() if isinstance(m, _StackedParameters)]
        for layer in layers:
            layer.fixed = True
        try:
            yield
        finally:
            for layer in layers:
                layer.fixed = False

    def features(self, x: torch.Tensor, layer: str, *, pre_activation: bool = True) -> torch.Tensor:
        return self._net.features(x, layer, pre_activation=pre_activation)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits on its own part of `x`: (M, B, classes)."""
        return self._net(x)

    def shared_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits on the same batch `x` (B, C, H, W): (M, B, classes).

        The same values as `logits(stack([x] * M))`; with an `input_conv`, x is read once.
        """
        if not self._shares_input:
            return self.logits(self.stack([x] * len(self.members)))
        # the members' own normalization (one spec for all): x keeps its C channels
        return self._net._run(self.members[0].normalize(x), None, False)


class StackedLogits(nn.Module):
    """A stack as one model for the attack template (attacks/core.py): (B, M*C, H, W) in,
    (M*B, classes) out, member-major, so that labels repeated M times score every member on
    its own part of the input. The members are its submodules (for eval mode and freezing)."""

    def __init__(self, stack: StackedMembers):
        super().__init__()
        self.stack = stack
        self.members = nn.ModuleList(stack.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.logits(x).flatten(0, 1)


def stack_members(members: Sequence[Classifier]) -> StackedMembers | None:
    """The members run as one network, or None when they cannot be stacked.

    They can when there are at least two, all of one `stackable` classifier type with the same
    input spec, modules and parameter shapes, and every parametrized module has a stacked form here.
    """
    if len(members) < 2:
        return None
    first = members[0]
    if not getattr(type(first), "stackable", False) or any(type(m) is not type(first) for m in members):
        return None
    if any(m.spec != first.spec for m in members):  # the stack normalizes with the first member's statistics
        return None
    layout = [(n, type(mod)) for n, mod in first.named_modules()]
    shapes = [(n, p.shape) for n, p in first.named_parameters()]
    for m in members[1:]:
        if [(n, type(mod)) for n, mod in m.named_modules()] != layout:
            return None
        if [(n, p.shape) for n, p in m.named_parameters()] != shapes or m.layer_names != first.layer_names:
            return None
    net = copy.deepcopy(first)
    for name, module in list(net.named_modules()):
        if isinstance(module, _PER_CHANNEL):
            continue
        if next(module.children(), None) is not None:  # a container; its code is vouched for by `stackable`
            if any(True for _ in module.parameters(recurse=False)):
                return None  # with parameters of its own, which nothing here would stack
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Flatten)):
            return None
        stacked = _stack_module(name, [m.get_submodule(name) for m in members],
                                reads_input=name == first.input_conv)
        if stacked is None:
            return None
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, stacked)
    if any(True for _ in net.parameters()):
        return None
    net.mean = first.mean.repeat(1, len(members), 1, 1)
    net.std = first.std.repeat(1, len(members), 1, 1)
    return StackedMembers(members, net)
