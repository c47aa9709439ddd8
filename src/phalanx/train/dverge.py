"""DVERGE (Yang et al. 2020; report sections 2-4, Algorithm 1) and DVERGE+AdvT.

Each epoch draws one feature layer uniformly. Each batch distills, for every member m, the
examples x'_m = x'_{f_m^l}(x, x_s) (report eq. 1: look like the source x_s, have the
features of the target x at layer l), then member i minimizes

    loss_i = sum_{j != i} CE(f_i(x'_j), y_s)                          (report eq. 4, as the authors' code)

i.e. it learns to classify the other members' weak features by the source label, which
makes them strong features of f_i. With `plus_adv` (DVERGE+AdvT, report section 4),
loss_i = coeff * loss_i + CE(f_i(PGD_i(x_s)), y_s), as the authors' train_dverge.py; with
`clean_weight` > 0, clean_weight * CE(f_i(x), y) is added, the first term of report eq. 4.

Speed (see benchmarks/RESULTS.md): target features once per distillation instead of once
per step; input gradients only (parameters frozen during distillation); inputs in
channels_last; members of one small architecture run stacked (models/stacked.py: one
grouped kernel per layer for all members, in the distillation and in the update); and, for
members whose output does not depend on the rest of the batch (no BatchNorm in train mode),
one forward of member i over all other members' distilled batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks.diversity import transferability_matrix, vulnerability_diversity
from phalanx.errors import UsageError
from phalanx.attacks.distillation import DistillConfig, distill_stacked, distill_with
from phalanx.models import Classifier
from phalanx.models.stacked import StackedLogits, StackedMembers, stack_members
from phalanx.train.api import Batch, StepOutput, TrainingMethod


@dataclass(frozen=True)
class DvergeConfig:
    """DVERGE's parameters; defaults are the DVERGE authors' (arguments.py, train_dverge.py).

    - `distill`: eq. 1's solver, authors' eps 0.07 / step 0.007 / 10 steps / momentum 1
      (the report uses eps 8/255: `DistillConfig(eps=8/255)`).
    - `layers`: the taps an epoch may draw from; empty = all of the model's `layer_names`,
      as the authors' `random.randint(1, depth)`, which includes the logits layer.
    - `fixed_layer`: always distill at this layer (authors' --distill-fixed-layer/--distill-layer).
    - `plus_adv`, `adv_eps` 8/255, `adv_step` 2/255, `adv_steps` 10, `coeff` 1.0: DVERGE+AdvT
      (authors' --plus-adv, --eps, --alpha, --steps, --dverge-coeff). `coeff` weights the
      diversity term whatever else is added.
    - `clean_weight` 0.0: weight of the clean cross-entropy CE(f_i(x), y) on the target batch.
      Report eq. 4 is `clean_weight: 1` with `coeff` its alpha; the authors' code has no such
      term, hence 0.
    - `channels_last`: speed only (measured faster on CPU); results equal up to float rounding.
    - `stack_members`: speed only; run the members as one stacked network (models/stacked.py).
      `auto` stacks architectures measured faster that way (the seed Conv), `always` every
      stackable ensemble (an error otherwise), `never` none. Results equal up to float rounding.

    The authors' code trains each member on all other members' distilled batches at every step;
    neither it nor the report defines another schedule, so there is no option for one.
    """

    distill: DistillConfig = field(default_factory=DistillConfig)
    layers: tuple[str, ...] = ()
    fixed_layer: str | None = None
    plus_adv: bool = False
    adv_eps: float = 8 / 255
    adv_step: float = 2 / 255
    adv_steps: int = 10
    coeff: float = 1.0
    clean_weight: float = 0.0
    channels_last: bool = True
    stack_members: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        eps = self.distill.eps
        if not 0 < eps <= 1:  # a pixel-space Linf budget; 0 would distill nothing
            raise ValueError(f"distill.eps = {eps!r} is not allowed; expected a number in (0, 1] (an Linf budget "
                             "in pixels, e.g. 0.07 or 8/255)")
        if self.fixed_layer is not None and self.layers and self.fixed_layer not in self.layers:
            raise ValueError(f"fixed_layer {self.fixed_layer!r} is not among layers {list(self.layers)}")
        if not self.adv_eps >= 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")
        if not self.adv_step > 0:
            raise ValueError(f"adv_step must be > 0, got {self.adv_step}")
        if not isinstance(self.adv_steps, int) or self.adv_steps < 1:
            raise ValueError(f"adv_steps must be an integer >= 1, got {self.adv_steps!r}")
        if not self.coeff >= 0:
            raise ValueError(f"coeff must be >= 0, got {self.coeff}")
        if not self.clean_weight >= 0:
            raise ValueError(f"clean_weight must be >= 0, got {self.clean_weight}")
        if self.stack_members not in ("auto", "always", "never"):
            raise ValueError(f"stack_members must be auto, always or never, got {self.stack_members!r}")


def batch_coupled(model: nn.Module) -> bool:
    """Whether the model's train-mode output for one example depends on the rest of the batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def draw_layers(members: Sequence[Classifier], cfg: DvergeConfig, rng: torch.Generator) -> list[str]:
    """One distillation layer per member for an epoch: `fixed_layer`, or a uniform draw.

    With `layers` empty and members of different architectures, one uniform number picks
    the same relative depth in each member (the authors' ensembles share one architecture).
    """
    if cfg.fixed_layer is not None:
        chosen = [cfg.fixed_layer] * len(members)
    elif cfg.layers:
        k = int(torch.randint(len(cfg.layers), (1,), generator=rng, device=rng.device).item())
        chosen = [cfg.layers[k]] * len(members)
    else:
        u = float(torch.rand((), generator=rng, device=rng.device).item())
        chosen = [m.layer_names[min(int(u * len(m.layer_names)), len(m.layer_names) - 1)] for m in members]
    for m, layer in zip(members, chosen):
        if layer not in m.layer_names:
            raise UsageError(f"distillation layer {layer!r} is not a layer of {type(m).__name__}; "
                             f"allowed: {list(m.layer_names)}")
    return chosen


class Dverge(TrainingMethod):
    """The DVERGE training method (a `phalanx.train.api.TrainingMethod`)."""

    needs_source_batch: ClassVar[bool] = True

    def __init__(self, cfg: DvergeConfig) -> None:
        self.cfg = cfg
        self.layers: list[str] | None = None
        self._stack: StackedMembers | None = None
        self._stack_key: tuple[object, ...] = ()

    def start_epoch(self, epoch: int, members: Sequence[Classifier],
                    rng: torch.Generator) -> dict[str, object]:
        """Draws this epoch's layer (authors' train_dverge.py: a fresh draw every epoch)."""
        self.layers = draw_layers(members, self.cfg, rng)
        shared = len(set(self.layers)) == 1
        return {"layer": self.layers[0] if shared else list(self.layers)}

    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        if batch.x_source is None or batch.y_source is None:
            raise ValueError("DVERGE needs a source batch (Batch.x_source, Batch.y_source)")
        if self.layers is None:
            if self.cfg.fixed_layer is None:
                raise RuntimeError("call start_epoch before loss: it draws the distillation layer")
            self.layers = draw_layers(members, self.cfg, rng)
        if len(members) < 2:
            raise UsageError(f"DVERGE needs at least 2 members, got {len(members)}")
        x, x_s, y_s = batch.x, batch.x_source, batch.y_source
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            x_s = x_s.contiguous(memory_format=torch.channels_last)
        stack = self._stacked(members)
        if stack is not None:
            distilled = distill_stacked(stack, x_s, x, layer=self.layers[0], config=self.cfg.distill,
                                        generator=rng)
        else:
            distilled = [distill_with(m, x_s, x, layer=layer, config=self.cfg.distill, generator=rng)
                         for m, layer in zip(members, self.layers)]
        inputs, labels = self._member_batches(members, stack, distilled, Batch(x, batch.y, x_s, y_s), rng)
        ce = (_stacked_mean_ce(stack, inputs, labels) if stack is not None
              else torch.stack([_mean_ce_per_input(m, own, labels) for m, own in zip(members, inputs)]))
        return self._combine(ce)

    def _member_batches(self, members: Sequence[Classifier], stack: StackedMembers | None,
                        distilled: list[torch.Tensor], batch: Batch, rng: torch.Generator
                        ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """What each member trains on, and the labels (shared by all members) of each batch.

        Member i's batches: its other members' distilled ones in increasing member order (as the
        authors' loop), then the clean target batch (`clean_weight`) and its own PGD batch
        (`plus_adv`) when asked for.
        """
        n = len(members)
        inputs = [[d for j, d in enumerate(distilled) if j != i] for i in range(n)]
        labels = [batch.y_source] * (n - 1)
        if self.cfg.clean_weight > 0:
            for own in inputs:
                own.append(batch.x)
            labels.append(batch.y)
        if self.cfg.plus_adv:
            adv = (self._adversarial_stacked(stack, batch.x_source, batch.y_source, rng) if stack is not None
                   else [self._adversarial(m, batch.x_source, batch.y_source, rng) for m in members])
            for own, a in zip(inputs, adv):
                own.append(a)
            labels.append(batch.y_source)
        return inputs, labels

    def _combine(self, ce: torch.Tensor) -> StepOutput:
        """Each member's loss from its mean cross-entropies `ce` (members x batches, as
        `_member_batches` lists them): coeff * diversity [+ clean_weight * clean] [+ adversarial]."""
        others = ce.shape[0] - 1
        div = ce[:, :others].sum(dim=1)
        terms = self.cfg.coeff * div
        extras = {"diversity_loss": div.detach().mean()}
        column = others
        if self.cfg.clean_weight > 0:
            terms = terms + self.cfg.clean_weight * ce[:, column]
            extras["clean_loss"] = ce[:, column].detach().mean()
            column += 1
        if self.cfg.plus_adv:
            terms = terms + ce[:, column]
            extras["adversarial_loss"] = ce[:, column].detach().mean()
        return StepOutput(terms.sum(), terms.detach(), extras)

    def _stacked(self, members: Sequence[Classifier]) -> StackedMembers | None:
        """The members as one stacked network when `stack_members` asks for it (built once, reused)."""
        mode = self.cfg.stack_members
        if mode == "never" or len(set(self.layers or ())) > 1:
            return None
        if mode == "auto" and not all(getattr(type(m), "prefers_stacking", False) for m in members):
            return None
        first = next(members[0].parameters())
        key = (*map(id, members), first.device, first.dtype)
        if self._stack is None or self._stack_key != key:
            self._stack, self._stack_key = stack_members(members), key
        if self._stack is None and mode == "always":
            raise UsageError("stack_members = always, but these members cannot be stacked (they need one "
                             "stackable architecture: " + ", ".join(sorted({type(m).__name__ for m in members}))
                             + "); use auto or never")
        return self._stack

    def diagnostics(self, members: Sequence[Classifier], x_u8: torch.Tensor, y: torch.Tensor,
                    rng: torch.Generator) -> dict[str, object]:
        """Per-epoch diagnostics for metrics.jsonl on the first `DIAGNOSTIC_EXAMPLES` validation images.

        `transferability`: `transferability_matrix` at the authors' eval eps 0.03 and step
        eps/5 (eval_transferability.py), with 10 steps instead of 50 and all examples (not only
        those every member gets right), so that it stays cheap and defined early in training.
        `vulnerability_diversity`: report eq. 2 at this epoch's distillation layer(s).
        The random starts come from a generator of their own, seeded the same at every call,
        so that epochs are compared on equal terms and `rng` (the training stream) is untouched.
        """

        device = next(members[0].parameters()).device
        n = min(DIAGNOSTIC_EXAMPLES, len(y))
        x = x_u8[:n].to(device).float().div_(255)
        y = y[:n].to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        layers = self.layers if self.layers is not None else draw_layers(members, self.cfg, gen)
        half = n // 2  # targets and sources: two disjoint halves, as two independent batches
        out: dict[str, object] = {
            "transferability": transferability_matrix(members, x, y, eps=0.03, alpha=0.006, steps=10,
                                                      only_correct=False, generator=gen),
        }
        if half > 0 and len(set(layers)) == 1:
            out["vulnerability_diversity"] = vulnerability_diversity(
                members, x[:half], y[:half], x[half:2 * half], y[half:2 * half], layer=layers[0],
                distill_cfg=self.cfg.distill, generator=gen)
        return out

    def _adversarial(self, m: Classifier, x_s: torch.Tensor, y_s: torch.Tensor,
                     rng: torch.Generator) -> torch.Tensor:
        from phalanx.attacks import pgd

        # The authors run Linf_PGD with the member in train mode; phalanx's pgd attacks in
        # eval mode (only BatchNorm models see a difference).
        return pgd(m, x_s, y_s, eps=self.cfg.adv_eps, alpha=self.cfg.adv_step, steps=self.cfg.adv_steps,
                   random_start=True, generator=rng)

    def _adversarial_stacked(self, stack: StackedMembers, x_s: torch.Tensor, y_s: torch.Tensor,
                             rng: torch.Generator) -> list[torch.Tensor]:
        """`_adversarial` for every member by one stacked PGD: the same random starts, in member order."""
        from phalanx.attacks.core import Norm, attack_mode, check_threat_model, iterate, sample_in_ball

        n = len(stack)
        starts = [sample_in_ball(x_s, eps=self.cfg.adv_eps, norm=Norm.LINF, generator=rng) for _ in range(n)]
        model = StackedLogits(stack)
        clean = stack.stack([x_s] * n)
        with attack_mode(model), stack.parameters_fixed():
            adv = iterate(model, clean, y_s.repeat(n), stack.stack(starts),
                          eps=self.cfg.adv_eps, alpha=self.cfg.adv_step, steps=self.cfg.adv_steps, norm=Norm.LINF)
        # the post-condition every registered attack carries (attacks.core.attack)
        check_threat_model(adv, clean, budget=self.cfg.adv_eps, norm=Norm.LINF, attack_name="stacked PGD (dverge+advt)")
        return stack.unstack(adv)


def _mean_ce_per_input(model: Classifier, inputs: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of `model` on each batch in `inputs` (labelled by `labels`), shape (len(inputs),).

    One forward over the concatenation when the model treats examples independently; with
    train-mode BatchNorm, one forward per batch, so that batch statistics stay per batch as
    in the authors' loop.
    """
    if batch_coupled(model) or len(inputs) == 1:
        return torch.stack([F.cross_entropy(model(z), y) for z, y in zip(inputs, labels)])
    logits = model(torch.cat(inputs))
    ce = F.cross_entropy(logits, torch.cat(labels), reduction="none")
    return ce.view(len(inputs), -1).mean(dim=1)


def _stacked_mean_ce(stack: StackedMembers, inputs: list[list[torch.Tensor]],
                     labels: list[torch.Tensor]) -> torch.Tensor:
    """`_mean_ce_per_input` for every member at once: (M, batches per member) mean cross-entropies.

    Slot k stacks every member's k-th batch, so each member sees its batches in the order of
    the per-member loop (which matters for train-mode BatchNorm's running statistics).
    """
    n = len(stack)
    slots = [stack.stack([own[k] for own in inputs]) for k in range(len(labels))]
    if any(batch_coupled(m) for m in stack.members):  # train-mode BatchNorm: one batch per forward
        logits = torch.cat([stack.logits(z) for z in slots], dim=1)
    else:
        logits = stack.logits(torch.cat(slots))
    ce = F.cross_entropy(logits.flatten(0, 1), torch.cat(labels).repeat(n), reduction="none")
    return ce.view(n, len(slots), -1).mean(dim=2)


DIAGNOSTIC_EXAMPLES = 256

@dataclass(frozen=True)
class DvergeAdvtConfig(DvergeConfig):
    """DVERGE+AdvT (report section 4): DVERGE plus PGD training of each member on itself."""

    plus_adv: bool = True
