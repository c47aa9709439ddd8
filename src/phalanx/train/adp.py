"""Adaptive Diversity Promoting (Pang et al., ICML 2019, "Improving Adversarial Robustness via
Promoting Ensemble Diversity": the ADP paper).

For an example (x, y) and N members with softmax predictions p_1..p_N over K classes:

    L_ADP = sum_i CE(p_i, y) - alpha * H(p_bar) - beta * log(ED)

- p_bar = (1/N) sum_i p_i, the ensemble's averaged prediction, and H its Shannon entropy (the
  ADP paper's ensemble entropy);
- ED = det(M^T M), the ensemble diversity: M is K-1 by N, its column i member i's non-maximal
  prediction (p_i without its y-th entry) L2-normalised, so ED is the squared volume those
  unit vectors span: 1 when they are orthogonal, 0 when two coincide.

The objective is averaged over the batch. Every term couples the members only through their
predictions on the same x, so one forward pass per member suffices (no input gradients).

Where the paper leaves details open, the authors' code (github.com/P2333/Adaptive-Diversity-Promoting,
utils.py) decides; each choice is marked below. One deliberate difference: the cross-entropy is
computed from the logits (exact), where Keras clips the probabilities to [1e-7, 1 - 1e-7]
(keras categorical_crossentropy); the two differ only for predictions beyond that clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phalanx.errors import UsageError
from phalanx.models import Classifier
from phalanx.train.api import Batch, StepOutput, TrainingMethod

LOG_OFFSET = 1e-20  # ADP authors' utils.py log_offset: H(p) = -sum p log(p + 1e-20), finite at p = 0
DET_OFFSET = 1e-6  # ADP authors' utils.py det_offset: log det(M^T M + 1e-6 I), finite for coinciding members


@dataclass(frozen=True)
class AdpConfig:
    """ADP's parameters; defaults are the ADP paper's ADP_{2,0.5} (its CIFAR-10 setting).

    - `alpha` 2: weight of the ensemble entropy (ADP authors' README: --lamda=2.0).
    - `beta` 0.5: weight of the log ensemble diversity (ADP authors' README: --log_det_lamda=0.5).
    """

    alpha: float = 2.0
    beta: float = 0.5

    def __post_init__(self) -> None:
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0 (the ADP paper uses alpha 2, "
                                 f"beta 0.5), got {value!r}")


def ensemble_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H of the members' averaged prediction, per example: probs (N, B, K) -> (B,)."""
    mean = probs.mean(dim=0)
    return -(mean * torch.log(mean + LOG_OFFSET)).sum(dim=-1)


def non_maximal_predictions(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's prediction without the true class, L2-normalised: logits (N, B, K) -> (N, B, K-1).

    The normalisation cancels any common factor, so normalising the softmax over the K-1 other
    classes equals normalising p_i without p_iy, and stays exact when p_iy rounds to 1.
    """
    n, b, k = logits.shape
    idx = torch.arange(k - 1, device=logits.device).expand(b, k - 1)
    idx = idx + (idx >= y[:, None])  # the classes other than y, in order (no mask: no device sync)
    others = logits.gather(-1, idx.expand(n, b, k - 1))
    return F.normalize(others.softmax(dim=-1), dim=-1)


def log_ensemble_diversity(non_maximal: torch.Tensor) -> torch.Tensor:
    """log det(M^T M + DET_OFFSET * I) per example: non_maximal (N, B, K-1) -> (B,).

    The N-by-N Gram matrix is positive definite with the offset, so its log-determinant is twice
    the log of its Cholesky diagonal (as TensorFlow's logdet, the authors' tf.linalg.logdet);
    computed in float64, where coinciding members' determinant (DET_OFFSET^(N-1) N) stays exact.
    """
    m = non_maximal.transpose(0, 1).double()  # (B, N, K-1)
    gram = m @ m.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + DET_OFFSET * eye)
    return (2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)).to(non_maximal.dtype)


def adp_objective(logits: torch.Tensor, y: torch.Tensor, *, alpha: float, beta: float) -> StepOutput:
    """L_ADP on the members' logits (N, B, K) for labels y (B,), averaged over the batch.

    `member_losses` logs each member's mean CE; `extras` the batch means of the ensemble entropy
    and of log(ED).
    """
    if logits.shape[0] < 2:
        raise UsageError(f"ADP needs at least 2 members (its diversity compares them), got {logits.shape[0]}")
    if logits.shape[-1] < 3:
        raise UsageError(f"ADP needs at least 3 classes (non-maximal predictions of K-1 >= 2 entries), "
                         f"got {logits.shape[-1]}")
    with torch.autocast(logits.device.type, enabled=False):  # float32 also under bfloat16 training
        logits = logits.float()
        ce = torch.stack([F.cross_entropy(z, y) for z in logits])
        entropy = ensemble_entropy(logits.softmax(dim=-1)).mean()
        log_ed = log_ensemble_diversity(non_maximal_predictions(logits, y)).mean()
    total = ce.sum() - alpha * entropy - beta * log_ed
    extras = {"ensemble_entropy": entropy.detach(), "log_ensemble_diversity": log_ed.detach()}
    return StepOutput(total, ce.detach(), extras)


class Adp(TrainingMethod):
    """ADP training (a `phalanx.train.api.TrainingMethod`)."""


    def __init__(self, cfg: AdpConfig) -> None:
        self.cfg = cfg


    def loss(self, members: Sequence[Classifier], batch: Batch, rng: torch.Generator) -> StepOutput:
        logits = torch.stack([m(batch.x) for m in members])
        return adp_objective(logits, batch.y, alpha=self.cfg.alpha, beta=self.cfg.beta)
