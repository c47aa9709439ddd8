"""Diversity Training with the Gradient Alignment Loss (Kariyappa & Qureshi 2019, GAL paper).

Per example, each member's input gradient of its cross-entropy, grad_x J_i (eq. 6's vectors),
the pairwise cosine similarities CS_ab (eq. 6), and

    GAL = log( sum_{1 <= a < b <= N} exp(CS_ab) )                       (eq. 8)

a smooth stand-in for the coherence max_{a != b} CS_ab (eq. 7). The objective is

    Loss = (1/N) sum_i J(theta_i, x, y) + lambda * GAL                  (eq. 9)

with GAL averaged over the batch. The gradients are taken with `create_graph=True`, so the GAL
term is differentiated through them (double back-propagation) into every member's parameters.
Gradients, cosines, coherence and GAL are `phalanx.geometry`'s, the functions the evaluation
measures them with (`phalanx.eval.gradients`).

Data (section 4.1): the batch as the loop gives it (shifts/flips/crops: the loop's
`data.augment`) plus a copy with truncated-normal noise N(0, sigma = noise_eps / 2), both used
for the CE and the GAL terms.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.data.batching import truncated_normal
from phalanx.errors import UsageError
from phalanx.geometry import ce_input_gradients, coherence, gal_loss, pairwise_cosines
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod


@dataclass(frozen=True)
class GalConfig:
    """GAL's parameters; defaults from the GAL paper.

    - `gal_lambda` 0.5: lambda of eq. 9 (section 4.1: "We set lambda = 0.5").
    - `noise_eps` 0.09: the noisy copy's eps, sigma = eps / 2 (section 4.1: eps 0.3 for MNIST,
      0.09 for CIFAR-10); 0 disables the noisy copy.
    - `warn_relu` True: warn once when a member uses ReLU (section 3.4 needs leaky ReLU).
    """

    gal_lambda: float = 0.5
    noise_eps: float = 0.09
    warn_relu: bool = True

    def __post_init__(self) -> None:
        if not self.gal_lambda >= 0:
            raise ValueError(f"gal_lambda must be >= 0, got {self.gal_lambda}")
        if not self.noise_eps >= 0:
            raise ValueError(f"noise_eps must be >= 0, got {self.noise_eps}")


def add_truncated_noise(x: torch.Tensor, *, eps: float, generator: torch.Generator) -> torch.Tensor:
    """The GAL paper's D_noise (section 4.1): x + N(0, (eps/2)^2) noise truncated at 2 standard
    deviations (TensorFlow's truncated_normal, which the authors used), clamped to [0, 1]."""
    noise = truncated_normal(x.shape, std=eps / 2, generator=generator, dtype=x.dtype).to(x.device)
    return (x + noise).clamp(0.0, 1.0)


def uses_relu(model: nn.Module) -> bool:
    """Whether any submodule of `model` is a (non-leaky) ReLU."""
    return any(isinstance(m, nn.ReLU) for m in model.modules())


class Gal(TrainingMethod):
    """Diversity Training (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: GalConfig) -> None:
        self.cfg = cfg
        self._warned = False

    def start_epoch(self, epoch: int, members: Sequence[Classifier], rng: torch.Generator) -> dict[str, object]:
        self.check_members(members)
        return {}

    def check_members(self, members: Sequence[nn.Module]) -> None:
        """At least two members; a warning (once) when one uses ReLU (GAL paper section 3.4)."""
        if len(members) < 2:
            raise UsageError(f"GAL needs at least 2 members, got {len(members)}; set model.members >= 2")
        if self.cfg.warn_relu and not self._warned and any(uses_relu(m) for m in members):
            self._warned = True
            warnings.warn("GAL: a member uses ReLU, whose sparse input gradients stall the GAL term "
                          "(GAL paper section 3.4); use model.activation: leaky_relu", stacklevel=2)

    def inputs(self, batch: Batch, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The training data of section 4.1: the batch, plus its noisy copy when noise_eps > 0."""
        if self.cfg.noise_eps == 0:
            return batch.x, batch.y
        noisy = add_truncated_noise(batch.x, eps=self.cfg.noise_eps, generator=rng)
        return torch.cat([batch.x, noisy]), torch.cat([batch.y, batch.y])

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        self.check_members(members)
        x, y = self.inputs(batch, rng)
        return gal_objective(members, x, y, self.cfg.gal_lambda)


def gal_objective(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                  gal_lambda: float) -> StepOutput:
    """Eq. 9 on (x, y): the members' average CE plus lambda times the batch-mean GAL.

    `member_losses` logs each member's CE; `extras` the GAL and the coherence (eq. 7), both
    batch means. Shared by `gal` and `ensadv+gal`.
    """
    losses, grads = ce_input_gradients(members, x, y, create_graph=gal_lambda > 0)
    cos = pairwise_cosines(grads)
    gal = gal_loss(cos).mean()
    ce = torch.stack(losses).mean()  # eq. 9's 1/N sum_i: the average, not the sum, of the CEs
    total = ce + gal_lambda * gal if gal_lambda > 0 else ce
    extras = {"gal": gal.detach(), "coherence": coherence(cos.detach()).mean()}
    return StepOutput(total, torch.stack(losses).detach(), extras)
