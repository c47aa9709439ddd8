"""How sure a measured accuracy is: the 95% Wilson score interval, kept in every evaluation record."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

Z95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(correct: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct / n` (Wilson 1927; Brown, Cai & DasGupta 2001).

    With p = correct / n: centre (p + z²/2n) / (1 + z²/n), half-width
    z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²). Unlike the normal (Wald) interval it stays inside
    [0, 1] and does not shrink to a point at 0% or 100%, where robust accuracies often lie
    (0 of 360 correct still allows up to 1.06%). n = 0 measures nothing: (0.0, 1.0).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(correct, bool) or not isinstance(correct, int) or not 0 <= correct <= n:
        raise ValueError(f"correct must be an integer in [0, n={n}], got {correct!r}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a finite number > 0, got {z!r}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    # at 0 or n correct the bound is exactly 0 or 1; rounding would leave 1e-17 or 1 - 1e-16
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


def record_n(record: Mapping[str, Any]) -> int | None:
    """A record's n as an int, or None when it is not a whole number >= 0 (a malformed record)."""
    value = record.get("n")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 and value == int(value) else None


def record_ci95(record: Mapping[str, Any]) -> tuple[float, float] | None:
    """The 95% interval of an evaluation record's accuracy, in [0, 1].

    The record's own `ci95` when it holds a well-formed one; otherwise (files written before
    records carried it) the Wilson interval of round(accuracy * n) correct out of n. None when the
    record has no usable accuracy or n, so there is nothing to compute it from.
    """
    stored = record.get("ci95")
    if (isinstance(stored, (list, tuple)) and len(stored) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stored)
            and 0 <= stored[0] <= stored[1] <= 1):
        return float(stored[0]), float(stored[1])
    n, acc = record_n(record), record.get("accuracy")
    if n is None or isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
        return None
    return wilson_interval(min(n, max(0, round(acc * n))), n)


def add_ci95(records: Iterable[MutableMapping[str, Any]]) -> None:
    """Give each evaluation record `ci95`: [lo, hi], the Wilson interval of round(accuracy * n) of n.

    Always recomputed from the record's accuracy and n (an existing `ci95` is replaced). A clean
    record averaged over `repeats` random subsets of n examples gets the interval of one subset's n,
    not a narrower one: the subsets are drawn from the same test split and overlap, so they are not
    `repeats` independent measurements (dividing `accuracy_std` by sqrt(repeats) would overclaim),
    and the mean of several subsets' accuracies is never less precise than one subset's. The
    interval of n is therefore conservative, and it matches the n of the attacked rows beside it;
    `accuracy_std` stays in the record as the spread between subsets.
    """
    for record in records:
        n = record_n(record)
        if n is None:
            raise ValueError(f"record {record.get('model')!r} {record.get('attack')!r}: n must be an "
                             f"integer >= 0, got {record.get('n')!r}")
        acc = record["accuracy"]
        if not 0 <= acc <= 1:
            raise ValueError(f"record {record.get('model')!r} {record.get('attack')!r}: accuracy must be "
                             f"in [0, 1], got {acc!r}")
        record["ci95"] = list(wilson_interval(min(n, round(acc * n)), n))
