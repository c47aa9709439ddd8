"""DVERGE (Yang et al. 2020; report sections 2-4, Algorithm 1) and DVERGE+AdvT.

Each epoch draws one feature layer uniformly. Each batch distills, for every member m, the
examples x'_m = x'_{f_m^l}(x, x_s) (report eq. 1: look like the source x_s, have the
features of the target x at layer l), then member i minimizes

    loss_i = sum_{j != i} CE(f_i(x'_j), y_s)                          (report eq. 4, as the authors' code)

i.e. it learns to classify the other members' weak features by the source label, which
makes them strong features of f_i. With `plus_adv` (DVERGE+AdvT, report section 4),
loss_i = coeff * loss_i + CE(f_i(PGD_i(x_s)), y_s), as the authors' train_dverge.py.

Speed (see benchmarks/RESULTS.md): target features once per distillation instead of once
per step; input gradients only (parameters frozen during distillation); inputs in
channels_last; and, for members whose output does not depend on the rest of the batch (no
BatchNorm in train mode), one forward of member i over all other members' distilled batches.
Stacking same-architecture members with torch.func (vmap) was measured on CPU and did not
help, so it is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from phalanx.attacks.distillation import DistillConfig, distill_with
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput


@dataclass(frozen=True)
class DvergeConfig:
    """DVERGE's parameters; defaults are the DVERGE authors' (arguments.py, train_dverge.py).

    - `distill`: eq. 1's solver, authors' eps 0.07 / step 0.007 / 10 steps / momentum 1
      (the report uses eps 8/255: `DistillConfig(eps=8/255)`).
    - `layers`: the taps an epoch may draw from; empty = all of the model's `layer_names`,
      as the authors' `random.randint(1, depth)`, which includes the logits layer.
    - `fixed_layer`: always distill at this layer (authors' --distill-fixed-layer/--distill-layer).
    - `plus_adv`, `adv_eps` 8/255, `adv_step` 2/255, `adv_steps` 10, `coeff` 1.0: DVERGE+AdvT
      (authors' --plus-adv, --eps, --alpha, --steps, --dverge-coeff).
    - `channels_last`: speed only (measured faster on CPU); results equal up to float rounding.

    The authors' code has no clean cross-entropy term (report eq. 4's first term) and only the
    "all other members" schedule, so neither is an option here.
    """

    distill: DistillConfig = field(default_factory=DistillConfig)
    layers: tuple[str, ...] = ()
    fixed_layer: str | None = None
    plus_adv: bool = False
    adv_eps: float = 8 / 255
    adv_step: float = 2 / 255
    adv_steps: int = 10
    coeff: float = 1.0
    channels_last: bool = True

    def __post_init__(self) -> None:
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
            raise ValueError(f"distillation layer {layer!r} is not a layer of {type(m).__name__}; "
                             f"allowed: {list(m.layer_names)}")
    return chosen


class Dverge:
    """The DVERGE training method (`TrainingMethod` protocol of `phalanx.train.api`)."""

    name: ClassVar[str] = "dverge"
    needs_source_batch: ClassVar[bool] = True

    def __init__(self, cfg: DvergeConfig) -> None:
        self.cfg = cfg
        self.layers: list[str] | None = None

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
            raise ValueError(f"DVERGE needs at least 2 members, got {len(members)}")
        x, x_s, y_s = batch.x, batch.x_source, batch.y_source
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            x_s = x_s.contiguous(memory_format=torch.channels_last)
        distilled = [distill_with(m, x_s, x, layer=layer, config=self.cfg.distill, generator=rng)
                     for m, layer in zip(members, self.layers)]
        adv = [self._adversarial(m, x_s, y_s, rng) for m in members] if self.cfg.plus_adv else None

        terms, div_logs = [], []
        for i, m in enumerate(members):
            inputs = [d for j, d in enumerate(distilled) if j != i]
            if adv is not None:
                inputs.append(adv[i])
            per_input = _mean_ce_per_input(m, inputs, y_s)
            div = per_input[: len(members) - 1].sum()
            div_logs.append(float(div.detach()))
            terms.append(self.cfg.coeff * div + per_input[-1] if adv is not None else div)
        extras = {"diversity_loss": sum(div_logs) / len(div_logs)}
        return StepOutput(torch.stack(terms).sum(), [float(t.detach()) for t in terms], extras)

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
        from phalanx.eval.diversity import transferability_matrix, vulnerability_diversity

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


def _mean_ce_per_input(model: Classifier, inputs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `model` on each batch in `inputs` (all labelled `y`), shape (len(inputs),).

    One forward over the concatenation when the model treats examples independently; with
    train-mode BatchNorm, one forward per batch, so that batch statistics stay per batch as
    in the authors' loop.
    """
    if batch_coupled(model) or len(inputs) == 1:
        return torch.stack([F.cross_entropy(model(z), y) for z in inputs])
    logits = model(torch.cat(inputs))
    ce = F.cross_entropy(logits, y.repeat(len(inputs)), reduction="none")
    return ce.view(len(inputs), -1).mean(dim=1)


DIAGNOSTIC_EXAMPLES = 256

@dataclass(frozen=True)
class DvergeAdvtConfig(DvergeConfig):
    """DVERGE+AdvT (report section 4): DVERGE plus PGD training of each member on itself."""

    plus_adv: bool = True
