"""The contract between the shared training loop and one training method.

A method is built from its frozen config dataclass. The loop owns data, optimizer, schedule,
logging and checkpoints; the method only says, per batch, what loss to minimize. Members'
parameters are disjoint, so the gradient of the summed loss gives each member exactly the
gradient of its own term (methods that couple members, such as GAL, rely on the same sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from phalanx.models import Classifier


@dataclass
class Batch:
    """One training step's data, pixels in [0, 1] on the training device.

    `x_source`/`y_source` is a second, independent batch, given only to methods with
    `needs_source_batch` (DVERGE's (x_s, y_s)).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_source: torch.Tensor | None = None
    y_source: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What a method returns for one batch. Every value stays a tensor on the training device: the
    loop sums them over the epoch and reads them back once per epoch (a float per member per step
    would be a host sync per step on a GPU)."""

    loss: torch.Tensor  # scalar: sum over members of each member's objective
    member_losses: torch.Tensor  # (members,), detached: each member's objective, for logging
    extras: dict[str, torch.Tensor | float] = field(default_factory=dict)  # scalars, for logging


class TrainingMethod:
    """The base of every method: the loop calls each hook below; a method overrides what it needs.

    `loss` is the only one without a default. `needs_source_batch`: the loop also passes a second,
    independent batch (DVERGE's (x_s, y_s)).
    """

    needs_source_batch: ClassVar[bool] = False

    def start_epoch(self, epoch: int, members: Sequence[Classifier], rng: torch.Generator) -> dict[str, object]:
        """Per-epoch choices (e.g. DVERGE's layer draw); returns what to log for the epoch."""
        return {}

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        """The objective for one batch; members are in train mode; `rng` lives on the batch's device."""
        raise NotImplementedError

    def diagnostics(self, members: Sequence[Classifier], x_u8: torch.Tensor, y: torch.Tensor,
                    rng: torch.Generator) -> dict[str, object] | None:
        """What to log every `train.diagnostics_every` epochs, measured on validation images; None: nothing."""
        return None

    def extra_parameters(self, members: Sequence[Classifier]) -> list[torch.nn.Parameter]:
        """The method's own trainable parameters (e.g. RRM's projections), built once the members
        are on their device; the optimizer trains them with the members."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own tensors, saved in the run's checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` saved (called on resume, after `extra_parameters`)."""
        if state:
            raise RuntimeError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")
