"""The ensemble as one model: the average of the members' probabilities, as in the seed papers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from phalanx.errors import UsageError
from phalanx.models.stacked import StackedMembers, stack_members


class Mixture(nn.Module):
    """N members whose output is log(mean_i softmax(f_i(x))).

    Returning log-probabilities keeps `argmax` and cross-entropy meaningful, so attacks and
    losses treat the mixture like any model that returns logits.

    `stacked` chooses how `member_logits` runs the members: None (auto) as one stacked network
    (models/stacked.py) when they can be stacked and their architecture `prefers_stacking`,
    else one call each; True always stacked (refused when they cannot be); False one call each.
    Both ways give the same values and gradients up to float rounding. The stack is only a view
    of the members: it holds no parameters or buffers of its own (the state_dict is the members'),
    reads their current weights at every call, and is rebuilt when members are replaced or moved.
    """

    def __init__(self, members: Sequence[nn.Module], *, stacked: bool | None = None):
        super().__init__()
        if len(members) == 0:
            raise UsageError("a Mixture needs at least one member")
        if not (stacked is None or isinstance(stacked, bool)):
            raise UsageError(f"stacked must be None (auto), True or False, got {stacked!r}")
        self.members = nn.ModuleList(members)
        self.stacked = stacked
        self._stack: StackedMembers | None = None
        self._stack_key: tuple[object, ...] | None = None
        if stacked and self._current_stack() is None:
            names = ", ".join(sorted({type(m).__name__ for m in members}))
            raise UsageError(f"stacked=True, but these members ({len(members)}: {names}) cannot be stacked: "
                             "that needs at least two of one stackable architecture and input spec; "
                             "use stacked=None (auto) or False")

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, stacked: shape (members, batch, classes)."""
        stack = self._stack_for_call()
        if stack is None:
            return torch.stack([m(x) for m in self.members])
        if x.dim() == 4:  # grouped convolutions are fast in channels_last only (benchmarks/RESULTS.md)
            x = x.contiguous(memory_format=torch.channels_last)
        return stack.shared_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_log_probs(self.member_logits(x))

    def runs_stacked(self) -> bool:
        """Whether `member_logits` would run the members stacked now (modes and members as they are)."""
        return self._stack_for_call() is not None

    def _stack_for_call(self) -> StackedMembers | None:
        members = list(self.members)
        if self.stacked is False:
            return None
        if self.stacked is None:
            if not all(getattr(type(m), "prefers_stacking", False) for m in members):
                return None
            # a stacked layer needs all members in one mode; one call each takes any mix
            modes = [[mod.training for mod in m.modules()] for m in members]
            if any(flags != modes[0] for flags in modes[1:]):
                return None
        stack = self._current_stack()
        if stack is None and self.stacked:
            raise ValueError("stacked=True, but the members (replaced since construction) cannot be stacked")
        return stack

    def _current_stack(self) -> StackedMembers | None:
        """The stack of the current members, rebuilt when a member was replaced, moved or cast
        (the stack keeps the input statistics of the device and dtype it was built on)."""
        key = tuple((id(m), *[(t.device, t.dtype) for t in _first_tensor(m)]) for m in self.members)
        if key != self._stack_key:
            # it holds the members it was built from, so their ids cannot be reused while it lives
            self._stack, self._stack_key = stack_members(list(self.members)), key
        return self._stack


def _first_tensor(module: nn.Module) -> list[torch.Tensor]:
    for t in module.parameters():
        return [t]
    for t in module.buffers():
        return [t]
    return []


def mixture_log_probs(member_logits: torch.Tensor) -> torch.Tensor:
    """log(mean_i softmax(logits_i)) over the first dimension, computed stably."""
    return torch.logsumexp(torch.log_softmax(member_logits, dim=-1), dim=0) - math.log(member_logits.shape[0])
