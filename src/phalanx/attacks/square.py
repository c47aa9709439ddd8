"""Square Attack (Andriushchenko et al., ECCV 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"), untargeted, under the Linf or L2 norm.

A random search that needs only the model's logits: each query changes the current point inside
one random square window, and the change is kept only when the margin loss decreases. The
square's side shrinks over the iterations (the schedule of p, the fraction of pixels it covers).
Written after the paper (Algorithms 1-3) and the authors' AutoAttack `square.py`, whose `standard`
suite runs it with 5,000 queries, p_init 0.8, one restart and the margin loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from phalanx.attacks.core import (
    Loss,
    Norm,
    _per_example,
    attack,
    check_count,
    l2_norms,
    per_example_loss,
    project,
    succeeded,
)
from phalanx.errors import UsageError

# Guards divisions by a norm that can be exactly zero (square.py adds the same 1e-12).
_TINY = 1e-12

# The p schedule of square.py: (last iteration, divisor of p_init), for a budget of 10,000 queries.
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
               (8000, 256))
_P_LAST_DIVISOR = 512
_SCHEDULE_QUERIES = 10_000


def p_schedule(it: int, *, p_init: float, queries: int, rescale: bool = False) -> float:
    """The fraction p of the image that the square of iteration `it` (0-based) covers.

    Halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (paper section 4, the
    schedule of square.py's p_selection, made for 10,000 queries). With `rescale`, `it` is first
    mapped onto 10,000 queries as int(it / queries * 10000) (square.py's resc_schedule; AutoAttack's
    `standard` suite turns it off, so by default the schedule counts absolute iterations).
    """
    if rescale:
        it = int(it / queries * _SCHEDULE_QUERIES)
    for last, divisor in _P_SCHEDULE:
        if it <= last:
            return p_init / divisor
    return p_init / _P_LAST_DIVISOR


def square_side(p: float, height: int, width: int, *, norm: Norm) -> int:
    """The side of the square for fraction p: round(sqrt(p * H * W)), at least 1 (Linf) or an odd
    number >= 3 (L2), at most the image's shorter side (as square.py)."""
    side = int(round(math.sqrt(p * height * width)))
    if norm is Norm.LINF:
        side = max(side, 1)
    else:
        side = max(side, 3)
        side += 1 - side % 2  # as square.py: an odd side, so the L2 window has a centre
    return min(side, height, width)


def centered_squares(rows: int, cols: int, *, like: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) sum of concentric squares around (rows // 2, cols // 2), the k-th (half-side k)
    weighted 1 / (k + 1)^2, scaled to unit L2 norm (the paper's M(r, s), section 3.2; square.py's
    eta_rectangles). A pixel at Chebyshev distance d from the centre gets sum_{k >= d} 1 / (k + 1)^2."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    count = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, count + 1, dtype=like.dtype, device=like.device) ** 2
    tails = weights.flip(0).cumsum(0).flip(0)  # tails[d] = sum_{k >= d} weights[k]
    dist_r = (torch.arange(rows, device=like.device) - rows // 2).abs()
    dist_c = (torch.arange(cols, device=like.device) - cols // 2).abs()
    out = tails[torch.maximum(dist_r[:, None], dist_c[None, :])]
    return out / out.norm().clamp(min=_TINY)


def l2_window(side: int, *, like: torch.Tensor) -> torch.Tensor:
    """The (side, side) L2 update of the paper (section 3.2, eta): centred squares on the top half
    and their negation on the bottom half, each half of equal norm, the whole of unit L2 norm."""
    top = centered_squares(side // 2, side, like=like)
    bottom = -centered_squares(side - side // 2, side, like=like)
    out = torch.cat([top, bottom], dim=0)
    return out / out.norm().clamp(min=_TINY)


# --- randomness: everything from `generator`, drawn on its device and moved to the batch's ----------

def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _random_signs(shape: tuple[int, ...], like: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Independent +1 / -1 entries of `shape`, like `like`'s dtype and device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=_draw_device(generator, like))
    return (2 * bits - 1).to(device=like.device, dtype=like.dtype)


def _random_offset(span: int, like: torch.Tensor, generator: torch.Generator | None) -> int:
    """A window offset in {0, ..., span - 1} (0 when span is 0): as square.py's random_int, which
    draws floor(U * span) and so never places a window flush with the bottom or right edge."""
    device = _draw_device(generator, like)
    return int(torch.randint(0, max(span, 1), (1,), generator=generator, device=device))


def _random_window(height: int, width: int, side: int, like: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[slice, slice, slice, slice]:
    """A side x side window, one position for the whole batch per iteration (as square.py)."""
    top = _random_offset(height - side, like, generator)
    left = _random_offset(width - side, like, generator)
    return slice(None), slice(None), slice(top, top + side), slice(left, left + side)


def _coin(like: torch.Tensor, generator: torch.Generator | None) -> bool:
    return bool(torch.rand(1, generator=generator, device=_draw_device(generator, like)) > 0.5)


# --- the two norms: a starting point and a candidate step ------------------------------------------

def _linf_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """Vertical stripes of +-eps, one sign per example, channel and column (paper Algorithm 2's
    initialisation; square.py), clamped to [0, 1]."""
    n, c, _, w = x.shape
    return (x + eps * _random_signs((n, c, 1, w), x, generator)).clamp(0.0, 1.0)


def _linf_candidate(x: torch.Tensor, x_best: torch.Tensor, eps: float, side: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """x_best with one square window moved by +-2 eps per example and channel, then put back into the
    ball and [0, 1], so each pixel of the window lands on a vertex x +- eps (paper Algorithm 2).

    One sign per example and channel, as the paper; square.py draws a single sign per channel for the
    whole batch."""
    n, c, h, w = x.shape
    window = _random_window(h, w, side, x, generator)
    step = 2 * eps * _random_signs((n, c, 1, 1), x, generator)
    x_new = x_best.clone()
    lo, hi = x[window] - eps, x[window] + eps
    x_new[window] = torch.minimum(torch.maximum(x_best[window] + step, lo), hi).clamp(0.0, 1.0)
    return x_new


def _onto_sphere(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """x + delta rescaled to L2 norm eps, clamped to [0, 1] (as square.py's normalize)."""
    scale = eps / l2_norms(delta).clamp(min=_TINY)
    return (x + delta * _per_example(scale, delta)).clamp(0.0, 1.0)


def _l2_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A grid of L2 windows (side min(H, W) // 5), each with a random sign per example and channel,
    scaled onto the eps sphere (paper Algorithm 3's initialisation; square.py). Each tile draws its own
    orientation; the grid is centred in each dimension (square.py centres it by the height)."""
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    delta = torch.zeros_like(x)
    rows, cols = h // side, w // side
    top0, left0 = (h - rows * side) // 2, (w - cols * side) // 2
    base = l2_window(side, like=x)
    for i in range(rows):
        for j in range(cols):
            tile = base.T if _coin(x, generator) else base
            signs = _random_signs((n, c, 1, 1), x, generator)
            top, left = top0 + i * side, left0 + j * side
            delta[:, :, top:top + side, left:left + side] = tile * signs
    return _onto_sphere(x, delta, eps)


def _l2_candidate(x: torch.Tensor, x_best: torch.Tensor, eps: float, side: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One L2 step of the paper (Algorithm 3): the mass of the current perturbation in two random
    windows W1, W2 (plus the unused budget eps^2 - ||delta||^2, split over channels) is moved into W1 as
    a fresh eta window with a random sign per example and channel added to W1's old direction, W2 is
    emptied, and the result is rescaled onto the eps sphere, so every candidate has norm eps before
    clamping to [0, 1]."""
    n, c, h, w = x.shape
    delta = x_best - x
    win1 = _random_window(h, w, side, x, generator)
    win2 = _random_window(h, w, side, x, generator)
    old = delta[win1]
    old_dir = old / old.flatten(2).norm(dim=2).clamp(min=_TINY)[..., None, None]
    union = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
    union[win1] = 1.0
    union[win2] = 1.0
    in_windows = (delta * union).flatten(2).pow(2).sum(dim=2)  # (n, c)
    unused = (eps ** 2 - l2_norms(delta).pow(2)).clamp(min=0.0)  # (n,)
    budget = (unused[:, None] / c + in_windows).sqrt()
    eta = l2_window(side, like=x)
    eta = eta.T if _coin(x, generator) else eta  # as square.py: eta transposed with probability 1/2
    new = eta * _random_signs((n, c, 1, 1), x, generator) + old_dir
    new = new / new.flatten(2).norm(dim=2).clamp(min=_TINY)[..., None, None] * budget[..., None, None]
    delta[win2] = 0.0
    delta[win1] = new
    return _onto_sphere(x, delta, eps)


# --- the random search -----------------------------------------------------------------------------

def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The margin loss the attacker lowers, z_y - max_{j != y} z_j (paper eq. 1 with L = margin),
    the negated CW margin."""
    return -per_example_loss(logits, y, Loss.CW)


def _random_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm,
                   queries: int, p_init: float, rescale: bool,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One run of the paper's Algorithm 1 from its norm's starting point, on examples the model
    classifies correctly: `queries` candidates after the start (as square.py's loop), each kept when
    its margin is lower or it fools the model. Only examples not yet fooled are queried.
    Returns (the last kept point of each example, whether it fools the model)."""
    start, candidate = (_linf_start, _linf_candidate) if norm is Norm.LINF else (_l2_start, _l2_candidate)
    _, _, h, w = x.shape
    out = start(x, eps, generator)
    logits = model(out)
    fooled = succeeded(logits, y, targeted=False)
    live = (~fooled).nonzero().squeeze(1)  # indices into the batch of the examples still queried
    x_live, best, y_live, margin = x[live], out[live], y[live], _margin(logits[live], y[live])
    for it in range(queries):
        if live.numel() == 0:
            break
        side = square_side(p_schedule(it, p_init=p_init, queries=queries, rescale=rescale), h, w, norm=norm)
        x_new = candidate(x_live, best, eps, side, generator)
        logits = model(x_new)
        margin_new, hit = _margin(logits, y_live), succeeded(logits, y_live, targeted=False)
        keep = (margin_new < margin) | hit  # as square.py: accept a lower margin loss or a success
        best = torch.where(_per_example(keep, best), x_new, best)
        margin = torch.where(keep, margin_new, margin)
        if hit.any():
            out[live[hit]] = best[hit]
            fooled[live[hit]] = True
            stay = ~hit
            live, x_live, y_live = live[stay], x_live[stay], y_live[stay]
            best, margin = best[stay], margin[stay]
    out[live] = best
    return out, fooled


def _square_arguments(args: dict[str, Any]) -> None:
    check_count("queries", args["queries"])
    check_count("restarts", args["restarts"])
    p_init = args["p_init"]
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise UsageError(f"p_init must be a number in (0, 1], got {p_init!r}")
    if args["x"].dim() != 4:
        raise UsageError(f"square needs images x of shape (batch, channels, height, width), "
                         f"got {tuple(args['x'].shape)}")


@attack(check=_square_arguments)
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm | str = "linf",
           queries: int = 5000, p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The untargeted Square Attack (Andriushchenko et al. 2020, Algorithm 1 with the Linf sampling of
    Algorithm 2 or the L2 sampling of Algorithm 3) on the margin loss, using only the model's logits.

    Examples the model already misclassifies are returned unchanged. Each other example starts at
    vertical +-eps stripes (Linf) or a grid of L2 windows on the eps sphere (L2), then makes `queries`
    random-search steps whose window covers a fraction p of the image, p from `p_schedule` (p_init,
    halved at fixed iterations; `rescale_schedule` maps them onto `queries` instead). With `restarts`
    > 1, examples still not fooled start again from a fresh starting point. Returned per example: a
    point that fools the model if one was found, else the last accepted point of the last run.
    Defaults are AutoAttack's `standard` suite: 5,000 queries, p_init 0.8, one restart.

    Args: model returns logits for pixels in [0, 1]; x (B, C, H, W) in [0, 1]; y (B,) class indices;
    eps >= 0; queries >= 1 and restarts >= 1 integers; 0 < p_init <= 1; `generator` gives every
    random draw (on its device), so a seed reproduces the attack.
    Returns x_adv shaped like x, inside the eps ball around x and [0, 1]; x is not modified.
    Example: ``x_adv = square(model, x, y, eps=8/255, norm="linf", queries=5000)``.
    """
    if x.shape[0] == 0 or eps == 0:
        return x.clone()
    with torch.no_grad():
        out = x.clone()
        todo = ~succeeded(model(x), y, targeted=False)  # as square.py: only correctly classified examples
        for _ in range(restarts):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_adv, fooled = _random_search(model, x[idx], y[idx], eps=eps, norm=norm, queries=queries,
                                           p_init=p_init, rescale=rescale_schedule, generator=generator)
            out[idx] = x_adv
            todo[idx[fooled]] = False
    return project(out, x, eps=eps, norm=norm)
