"""Gradient-alignment diagnostics of the GAL paper: the members' input-gradient cosine
similarities, coherence (eq. 7) and GAL (eq. 8) per example (Figure 4's histograms), and the
Gradient Aligned Adversarial Subspace analysis (GAAS, Tramèr et al. 2017; GAL paper section 4.4,
Figure 5).

The quantities are `phalanx.geometry`'s, the functions GAL training regularizes them with; this
module measures them on trained models. Everything returns plain tensors or JSON-ready dicts;
models are evaluated in eval mode with their modes, `requires_grad` and `.grad` left as found
(`attacks.attack_mode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from phalanx.attacks import attack_mode
from phalanx.errors import UsageError
from phalanx.geometry import ce_input_gradient, coherence, gal_loss, member_pairs, pairwise_cosines


def _ce_input_gradients_in_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                  batch_size: int) -> torch.Tensor:
    """`geometry.ce_input_gradient` over (x, y) in chunks of `batch_size`: shaped like x (B, ...)."""
    if len(y) == 0:
        return x.clone()
    return torch.cat([ce_input_gradient(model, x[i:i + batch_size], y[i:i + batch_size])[1]
                      for i in range(0, len(y), batch_size)])


def member_input_gradients(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                           batch_size: int = 500) -> torch.Tensor:
    """Each member's input gradient of its CE loss per example, flattened: shape (members, B, D)."""
    with attack_mode(*members):
        return torch.stack([_ce_input_gradients_in_chunks(m, x, y, batch_size).flatten(1) for m in members])


def gradient_alignment(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                       batch_size: int = 500) -> dict[str, Any]:
    """Per-example pairwise cosines, coherence and GAL of the members' CE input gradients (JSON-ready).

    Returns {"pairs": [[a, b], ...], "cosine": B x pairs, "coherence": [B], "gal": [B], "n": B}:
    ready for the coherence histograms of the paper's Figure 4.
    """
    cos = pairwise_cosines(member_input_gradients(members, x, y, batch_size=batch_size))
    return {"pairs": [list(p) for p in member_pairs(len(members))], "cosine": cos.tolist(),
            "coherence": coherence(cos).tolist(), "gal": gal_loss(cos).tolist(), "n": len(y)}


# --- regular Hadamard matrices ------------------------------------------------------------------

def _regular_4() -> torch.Tensor:
    return torch.ones(4, 4) - 2 * torch.eye(4)  # row sums 2 = sqrt(4)


def _regular_36() -> torch.Tensor:
    """J - 2A for A the Latin-square graph L_3(6) of the cyclic Latin square of order 6 (cells adjacent
    when they share a row, a column or a symbol): a strongly regular (36, 15, 6, 6) graph, i.e. a
    symmetric (36, 15, 6) design, so (J - 2A)^2 = 36 I and every row sums to 6."""
    cells = [(r, c) for r in range(6) for c in range(6)]
    a = torch.tensor([[float(p != q and (p[0] == q[0] or p[1] == q[1] or (p[0] + p[1]) % 6 == (q[0] + q[1]) % 6))
                       for q in cells] for p in cells])
    return torch.ones(36, 36) - 2 * a


def hadamard(k: int, *, regular: bool = True) -> torch.Tensor:
    """A k x k Hadamard matrix (entries +-1, H H^T = k I).

    regular=True (constant row sums sqrt(k), what GAAS needs so every direction is equally aligned
    with the gradient): k = 4^m or 36 * 4^m, as Kronecker products of J - 2I (order 4) and the
    order-36 matrix of `_regular_36`; regular Hadamard matrices only exist for k = 4u^2.
    regular=False: Sylvester's construction, k a power of 2.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be an integer >= 1, got {k!r}")
    if not regular:
        if k & (k - 1):
            raise UsageError(f"Sylvester's construction needs k a power of 2, got {k}")
        h = torch.ones(1, 1)
        while h.shape[0] < k:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    rest, h = k, torch.ones(1, 1)
    if rest % 36 == 0:
        rest, h = rest // 36, _regular_36()
    while rest % 4 == 0 and rest > 1:
        rest, h = rest // 4, torch.kron(h, _regular_4())
    if rest != 1 or k == 1:
        raise UsageError(f"no regular Hadamard matrix of order {k} is built here; allowed: 4^m or 36 * 4^m "
                         f"(4, 16, 36, 64, 144, 256, ...); order 25 does not exist (Hadamard orders are 1, 2 "
                         f"or multiples of 4)")
    return h


def gaas_directions(grad: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """k orthogonal Linf-eps directions aligned with each example's gradient (GAL paper section 4.4):
    the D input dimensions are cut into k equal blocks of D // k (the last D mod k dims get 0, which
    keeps the directions exactly orthogonal), and direction i is eps * h_i[block] * sign(grad).

    grad (B, ...) -> (B, k, ...).
    """
    b, d = grad.shape[0], grad[0].numel()
    if d < k:
        raise UsageError(f"need at least k = {k} input dimensions, got {d}")
    block = d // k
    pattern = torch.zeros(k, d, device=grad.device, dtype=grad.dtype)
    pattern[:, :block * k] = hadamard(k).to(grad).repeat_interleave(block, dim=1)
    dirs = eps * pattern[None] * grad.flatten(1).sign()[:, None]
    return dirs.view(b, k, *grad.shape[1:])


def gaas(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ks: Sequence[int] = (4, 16, 36, 64),
         eps_values: Sequence[float] = (0.03, 0.06, 0.09), batch_size: int = 100,
         progress: str | None = None) -> dict[str, Any]:
    """GAAS: for each k and eps, how many of the k gradient-aligned orthogonal directions
    (`gaas_directions`) are adversarial for each correctly classified example (x + r clamped to [0, 1]).

    Returns {"n": examples correctly classified, "results": [{"k", "eps", "counts": [n],
    "p_all": P(count >= k), "p_at_least": [P(count >= j) for j = 1..k]}, ...]}: p_all is the
    probability of finding k orthogonal adversarial directions (the paper's Figure 5).
    `progress`: the label of a bar over the (k, eps) grid (None: no bar).
    """
    for k in ks:
        hadamard(k)  # fail early on an unsupported order
    with attack_mode(model):
        with torch.no_grad():
            keep = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                              for i in range(0, len(y), batch_size)])
        xs, ys = x[keep], y[keep]
        grads = _ce_input_gradients_in_chunks(model, xs, ys, batch_size)
        results = []
        cells = [(k, eps) for k in ks for eps in eps_values]
        for k, eps in tqdm(cells, desc=progress, unit="cell", leave=False, disable=progress is None):
            counts = []
            for i in range(0, len(ys), batch_size):
                xb, yb, gb = xs[i:i + batch_size], ys[i:i + batch_size], grads[i:i + batch_size]
                cand = (xb[:, None] + gaas_directions(gb, k, eps)).clamp(0, 1)
                with torch.no_grad():
                    pred = model(cand.flatten(0, 1)).argmax(1).view(len(yb), k)
                counts.append((pred != yb[:, None]).sum(1))
            c = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
            n = max(len(c), 1)
            results.append({"k": k, "eps": eps, "counts": c.tolist(),
                            "p_all": float((c >= k).sum()) / n,
                            "p_at_least": [float((c >= j).sum()) / n for j in range(1, k + 1)]})
    return {"n": int(keep.sum()), "results": results}
