"""Diagnostics of how much the members' weak spots overlap (DVERGE, report section 2.2).

- `distilled_loss_matrix` / `vulnerability_diversity`: report eq. 2, the vulnerability
  diversity d(f_i, f_j), from the cross-entropy of one member on another's distilled features.
- `transferability_matrix`: accuracy of each member on PGD examples crafted on each member,
  the authors' within-ensemble transferability (eval/eval_transferability.py).

Both return plain lists of lists of floats (JSON-ready). Members are evaluated in eval mode
(as the authors' evaluation scripts, which load the models with train=False); their modes,
`requires_grad` and `.grad` are left as found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from phalanx.attacks import attack_mode, pgd
from phalanx.attacks.distillation import DistillConfig, distill_with
from phalanx.models import Classifier


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: need images (B, ...) and labels (B,) with B >= 1, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def distilled_loss_matrix(
    members: Sequence[Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    x_s: torch.Tensor,
    *,
    layer: str | Sequence[str],
    distill_cfg: DistillConfig = DistillConfig(),
    generator: torch.Generator | None = None,
) -> list[list[float]]:
    """L[i][j] = mean CE(f_j(x'_{f_i^l}(x, x_s)), y): member j's loss, w.r.t. the *target* label y,
    on the features that member i distilled from target x into source x_s (report eq. 1).

    As the authors' eval/eval_diversity.py (`losses[i, j]` = loss of model j on model i's
    distilled data, labelled with the target label). A low L[i][j] means f_j reads f_i's weak
    feature of x as x's class: their vulnerabilities overlap. `layer` is one layer name or
    several, averaged with equal weight (the expectation over a uniform l; the authors draw
    one layer per batch of 10).
    """
    _check_pair(x, y, "x, y")
    if x_s.shape != x.shape:
        raise ValueError(f"x_s must be shaped like x {tuple(x.shape)}, got {tuple(x_s.shape)}")
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers:
        raise ValueError("layer: give at least one layer name")
    n = len(members)
    total = torch.zeros(n, n, dtype=torch.float64)
    with attack_mode(*members):
        for name in layers:
            for i, source in enumerate(members):
                x_distilled = distill_with(source, x_s, x, layer=name, config=distill_cfg,
                                           generator=generator)
                with torch.no_grad():
                    for j, m in enumerate(members):
                        total[i, j] += float(F.cross_entropy(m(x_distilled), y))
    return (total / len(layers)).tolist()


def vulnerability_diversity(
    members: Sequence[Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    x_s: torch.Tensor,
    y_s: torch.Tensor,
    *,
    layer: str | Sequence[str],
    distill_cfg: DistillConfig = DistillConfig(),
    generator: torch.Generator | None = None,
) -> list[list[float]]:
    """d[i][j] = d(f_i, f_j) of report eq. 2, the vulnerability diversity:

        d(f_i, f_j) = 1/2 E_l [CE_{f_i}(x'_{f_j^l}(x, x_s), y) + CE_{f_j}(x'_{f_i^l}(x, x_s), y)]


    Symmetric by construction, = (L + L^T) / 2 with L from `distilled_loss_matrix`; the
    diagonal d[i][i] is member i's loss on its own distilled features. (The report prints the
    same-model terms L_{f_i}(x'_{f_i}), a typo: its own explanation, the DVERGE paper and the
    authors' eval_diversity.py use the cross terms.) Higher = more diverse. `y_s`, the source
    labels, do not enter eq. 2; they are checked for shape only, so that callers pass the pair
    they distilled from.
    """
    _check_pair(x_s, y_s, "x_s, y_s")
    loss = distilled_loss_matrix(members, x, y, x_s, layer=layer, distill_cfg=distill_cfg,
                                 generator=generator)
    n = len(members)
    return [[(loss[i][j] + loss[j][i]) / 2 for j in range(n)] for i in range(n)]


def transferability_matrix(
    members: Sequence[Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    restarts: int = 1,
    only_correct: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[float]]:
    """T[i][j] = accuracy of member j on PGD-Linf examples crafted on member i (diagonal: white-box).

    Follows the authors' eval/eval_transferability.py, which reports the attack success rate
    1 - T[i][j]: examples are restricted to those every member classifies correctly
    (`only_correct`), and with `restarts` > 1 each restart is a fresh random start and an
    example counts as correct for member j only if it is correct under every restart. (The
    authors use eps 0.03, alpha eps/5, 50 steps, 5 restarts on 1000 test images.)
    Raises ValueError when `only_correct` leaves no example.
    """
    _check_pair(x, y, "x, y")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    with attack_mode(*members), torch.no_grad():
        if only_correct:
            keep = torch.stack([m(x).argmax(1) == y for m in members]).all(0)
            if not bool(keep.any()):
                raise ValueError("no example is classified correctly by every member; "
                                 "pass only_correct=False")
            x, y = x[keep], y[keep]
    n = len(members)
    correct = torch.ones(n, n, x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        for i, source in enumerate(members):
            x_adv = pgd(source, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True,
                        generator=generator)
            with attack_mode(*members), torch.no_grad():
                for j, m in enumerate(members):
                    correct[i, j] &= m(x_adv).argmax(1) == y
    return correct.double().mean(-1).tolist()
