"""The geometry of the members' input gradients, written once for training and evaluation.

Training methods regularize it (GAL, GDR, TRS in `phalanx.train`) and the evaluation measures
it (`phalanx.eval.gradients`, `phalanx.eval.gdr`); both use these functions, so a number logged
during training and the same number measured afterwards are one computation. This module needs
only torch: it sits below every other layer. It leaves model modes alone; callers that measure
put the models in eval mode first (`phalanx.attacks.attack_mode`).

Shapes: B examples, N members, P = N (N - 1) / 2 unordered pairs of members, C classes.
`grads` is one gradient per member, each (B, ...) shaped like the input: a sequence of N tensors
or one (N, B, ...) tensor.

GAL paper (Kariyappa & Qureshi 2019): per example, CS_ab = cos(grad_x J_a, grad_x J_b) (eq. 6);
coherence max_{a != b} CS_ab (eq. 7); GAL = log sum_{a < b} exp(CS_ab) (eq. 8).

GDR (Adam & Speciel 2020, arXiv:2005.05750, and the authors' blog). The blog defines GDR as "the
volume of the adversarial subspace that simultaneously fools all models in an ensemble in the
same way (i.e. they all incorrectly predict the same wrong class), normalized by the volume of a
unit sphere of the same number of dimensions as models". The preprint's own text was not
available to us; this module implements that definition to first order, as follows (our
derivation, stated so that it can be checked):

Near x, member i's margin towards a wrong class c, z_c - z_y, changes by <g_i, delta> for a
perturbation delta, g_i = grad_x (z_c - z_y) of member i. A direction fools every member towards
c when <g_i, delta> > 0 for all i. Only delta's component in the span of g_1..g_N (N dimensions
for N members in general position) matters, so the rating is the fraction of the unit N-sphere
of that span inside the cone {delta : <g_i, delta> > 0 for all i}. For delta uniform on that
sphere, the signs of <g_i, delta> are those of a Gaussian vector whose correlation matrix is the
gradients' cosine matrix, so the rating is the Gaussian orthant probability

    GDR = P(w_1 > 0, ..., w_N > 0),   w ~ N(0, R),   R_ab = CS(g_a, g_b)

It depends only on the pairwise cosines: aligned gradients give 1/2 (half of all directions
fool everyone), orthogonal ones 2^-N, and two opposite gradients 0. Closed forms exist for
N <= 3 (Sheppard's formula; Girard's theorem for the spherical triangle):

    N = 2:  1/4 + asin(R_12) / (2 pi)
    N = 3:  1/8 + (asin R_12 + asin R_13 + asin R_23) / (4 pi)

and are used there; for N >= 4 the orthant probability has no closed form and is estimated by
Monte Carlo over `samples` Gaussian draws (standard error <= 0.5 / sqrt(samples)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Guards the division by a gradient norm that can be exactly zero: a zero gradient has cosine 0.
_TINY = 1e-12
# asin has an infinite slope at +-1; cosines are kept just inside so that gradients stay finite.
_COS_LIMIT = 1 - 1e-6


# --- input gradients ------------------------------------------------------------------------------

def ce_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`model`'s mean cross-entropy on (x, y), a scalar, and its per-example input gradient
    grad_x CE(f(x_b), y_b), shaped like x (B, ...).

    The gradient of the summed CE with respect to x gives each example its own CE's gradient.
    With `create_graph`, the gradient stays differentiable with respect to the parameters (double
    back-propagation, GAL paper section 3); the returned loss keeps its graph either way, so it
    can be back-propagated. Works inside `torch.no_grad()` callers.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(x), y, reduction="none")
        (grad,) = torch.autograd.grad(ce.sum(), x, create_graph=create_graph, retain_graph=True)
    return ce.mean(), grad


def ce_input_gradients(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                       create_graph: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`ce_input_gradient` of every member on the same (x, y): (N scalar losses, N gradients (B, ...))."""
    losses, grads = [], []
    for m in members:
        loss, grad = ce_input_gradient(m, x, y, create_graph=create_graph)
        losses.append(loss)
        grads.append(grad)
    return losses, grads


def margin_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x (z_c - z_y) for every class c, per example: (C, B, ...); row y of each example is zero."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        true = logits.gather(1, y[:, None]).squeeze(1)
        grads = []
        for c in range(logits.shape[1]):
            (g,) = torch.autograd.grad((logits[:, c] - true).sum(), x, retain_graph=True)
            grads.append(g)
    return torch.stack(grads)


# --- cosines ---------------------------------------------------------------------------------------

def member_pairs(n: int) -> list[tuple[int, int]]:
    """The P unordered pairs (a, b), a < b, of n members in the column order of `pairwise_cosines`:
    (0, 1), (0, 2), ..., (1, 2), ..."""
    return list(itertools.combinations(range(n), 2))


def _unit_rows(grads: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Each member's gradients flattened to (B, D) and scaled to unit L2 norm (zero stays zero)."""
    return [F.normalize(g.flatten(1), dim=1, eps=_TINY) for g in grads]


def pairwise_cosines(grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """CS_ab of GAL paper eq. 6 for every pair a < b of members, per example: N x (B, ...) -> (B, P).

    Columns in the order of `member_pairs`; a zero gradient has cosine 0 with every other.
    Differentiable (GAL and TRS train through it).
    """
    n = len(grads)
    if n < 2:
        raise ValueError(f"pairwise cosines need the gradients of at least 2 members, got {n}")
    unit = _unit_rows(grads)
    return torch.stack([(unit[a] * unit[b]).sum(1) for a, b in member_pairs(n)], dim=1)


def cosine_matrix(grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """All cosines CS_ab of the members' gradients per example, ones on the diagonal:
    N x (B, ...) -> (B, N, N). The correlation matrix R of the GDR (module docstring)."""
    unit = torch.stack(_unit_rows(grads), dim=1)  # (B, N, D)
    cos = unit @ unit.transpose(1, 2)
    eye = torch.eye(len(grads), dtype=cos.dtype, device=cos.device)
    return cos * (1 - eye) + eye


def coherence(cosines: torch.Tensor) -> torch.Tensor:
    """GAL paper eq. 7, the largest pairwise cosine of each example: (B, P) -> (B,).

    `cosines` as `pairwise_cosines` returns them."""
    return cosines.amax(dim=1)


def gal_loss(cosines: torch.Tensor) -> torch.Tensor:
    """GAL paper eq. 8, log sum_{a<b} exp(CS_ab) per example, the smooth maximum of the cosines
    (between the coherence and the coherence + log P): (B, P) -> (B,)."""
    return torch.logsumexp(cosines, dim=1)


# --- the gradient diversity rating ----------------------------------------------------------------

def orthant_probability(corr: torch.Tensor, *, samples: int = 20000,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """P(w > 0 componentwise) for w ~ N(0, corr): (..., N, N) with a unit diagonal -> (...).

    Exact and differentiable for N <= 3; a Monte Carlo estimate over `samples` draws from
    `generator` (not differentiable) for N >= 4.
    """
    n = corr.shape[-1]
    if n == 1:
        return torch.full(corr.shape[:-2], 0.5, dtype=corr.dtype, device=corr.device)
    if n <= 3:
        iu = torch.triu_indices(n, n, offset=1, device=corr.device)
        rho = corr[..., iu[0], iu[1]].clamp(-_COS_LIMIT, _COS_LIMIT)
        return 2.0 ** -n + torch.asin(rho).sum(-1) / (2 ** (n - 1) * math.pi)
    device = generator.device if generator is not None else corr.device
    with torch.no_grad():
        vals, vecs = torch.linalg.eigh(corr.double())
        root = vecs * vals.clamp(min=0).sqrt().unsqueeze(-2)  # root @ root^T = corr
        u = torch.randn((samples, n), generator=generator, device=device, dtype=torch.float64).to(corr.device)
        w = torch.einsum("...ij,sj->...si", root, u)
        return (w > 0).all(dim=-1).double().mean(dim=-1).to(corr.dtype)


def gdr_from_gradients(grads: Sequence[torch.Tensor] | torch.Tensor, *, samples: int = 20000,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The GDR of each example from its members' gradients: N x (B, ...) -> (B,).

    An example where some member's gradient is zero gets 0 (no direction moves that member).
    Exact for N <= 3, Monte Carlo for N >= 4 (`orthant_probability`).
    """
    if len(grads) < 1:
        raise ValueError("GDR needs at least one member's gradients")
    rating = orthant_probability(cosine_matrix(grads), samples=samples, generator=generator)
    alive = torch.stack([g.flatten(1).norm(dim=1) > 0 for g in grads]).all(dim=0)
    return torch.where(alive, rating, torch.zeros_like(rating))


def smooth_gdr(grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A differentiable GDR per example for regularization: N x (B, ...) -> (B,).

    Exact for N <= 3 members; for N >= 4 the mean over all triples of members of their exact
    3-member GDR (each triple's cone contains the N-member cone, so this is an upper bound of the
    N-member GDR)."""
    n = len(grads)
    if n < 2:
        raise ValueError(f"the GDR regularizer needs the gradients of at least 2 members, got {n}")
    cos = cosine_matrix(grads)
    if n <= 3:
        return orthant_probability(cos)
    triples = torch.combinations(torch.arange(n, device=cos.device), r=3)
    sub = cos[:, triples[:, :, None], triples[:, None, :]]  # (B, T, 3, 3)
    return orthant_probability(sub).mean(dim=1)
