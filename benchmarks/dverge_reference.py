"""The plain DVERGE step, written straight from Algorithm 1 and the authors' train_dverge.py.

It is the yardstick for `phalanx.train.dverge`: the tests check that the fast method gives the
same distilled examples and the same parameter update, and `benchmarks/dverge.py` times both.
Nothing here is tuned: one member and one pair at a time, the target features recomputed at
every distillation step, the full backward (parameter gradients included) for every input
gradient, and a separate forward per (i, j) pair, as the authors do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from phalanx.attacks.distillation import DistillConfig
from phalanx.models import Classifier


def plain_distill(model: Classifier, x_source: torch.Tensor, x_target: torch.Tensor, *, layer: str,
                  cfg: DistillConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Report eq. 1 the authors' way (distillation.py: Linf_distillation / gradient_wrt_feature)."""
    x_nat = x_source.detach()
    x = x_nat.clone()
    if cfg.random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + (2 * noise - 1) * cfg.eps
    x = x.clamp(0.0, 1.0)
    g = torch.zeros_like(x)
    for _ in range(cfg.steps):
        x = x.detach().requires_grad_(True)
        out = model.features(x, layer, pre_activation=cfg.pre_activation)
        target = model.features(x_target, layer, pre_activation=cfg.pre_activation).detach()
        loss = F.mse_loss(out, target)
        model.zero_grad()
        loss.backward()
        grad = x.grad.detach()
        with torch.no_grad():
            if cfg.momentum is not None:
                l1 = grad.flatten(1).norm(p=1, dim=1).clamp(min=1e-12)
                g = cfg.momentum * g + grad / l1.view(-1, 1, 1, 1)
                grad = g
            x = x - cfg.step_size * grad.sign()
            x = torch.max(torch.min(x, x_nat + cfg.eps), x_nat - cfg.eps).clamp(0.0, 1.0)
    model.zero_grad()
    return x.detach()


def dverge_plain_step(
    members: Sequence[Classifier],
    optimizers: Sequence[torch.optim.Optimizer],
    x: torch.Tensor,
    x_source: torch.Tensor,
    y_source: torch.Tensor,
    *,
    layers: Sequence[str],
    cfg: DistillConfig,
    generator: torch.Generator | None = None,
) -> list[float]:
    """One DVERGE iteration (Algorithm 1's inner loop) with one optimizer per member.

    `layers[m]` is member m's distillation layer. Returns each member's loss
    sum_{j != i} CE(f_i(x'_j), y_s) before its update.
    """
    distilled = [plain_distill(m, x_source, x, layer=layer, cfg=cfg, generator=generator)
                 for m, layer in zip(members, layers)]
    losses = []
    for i, (m, opt) in enumerate(zip(members, optimizers)):
        loss = torch.zeros((), device=x.device)
        for j, x_distilled in enumerate(distilled):
            if i != j:
                loss = loss + F.cross_entropy(m(x_distilled), y_source)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
