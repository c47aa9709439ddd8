"""Evaluate a run directory and keep the results in it as JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from phalanx.attacks import AttackSpec
from phalanx.config import SuiteConfig
from phalanx.errors import UsageError
from phalanx.eval.sanity import apply_sanity_checks
from phalanx.eval.whitebox import evaluate_whitebox
from phalanx.runs import open_run, write_eval_json

ALL_EXAMPLES: Final = "all"  # `examples=ALL_EXAMPLES`: the whole test split, whatever the run's eval.examples


def resolve_examples(examples: int | Literal["all"] | None, configured: int | None) -> int | None:
    """How many test examples to evaluate, None meaning the whole test split: `examples` when it is a
    number, None for ALL_EXAMPLES, and the run's `configured` eval.examples when `examples` is None."""
    if examples is None:
        return configured
    if examples == ALL_EXAMPLES:
        return None
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise UsageError(f"examples must be an integer >= 1 or {ALL_EXAMPLES!r}, got {examples!r}")
    return examples


def evaluate_run(run_dir: str | Path, *, attacks: Sequence[AttackSpec] | None = None,
                 examples: int | Literal["all"] | None = None, device: str | None = None,
                 progress: bool = False, large_eps: float | None = None,
                 suites: Sequence[SuiteConfig] | None = None, check_convergence: bool = False) -> dict[str, Any]:
    """White-box evaluation of a run's members and mixture on its dataset's test split.

    Uses the run's `eval` settings unless `attacks`/`suites`/`examples` are given (attacks given
    without suites run alone: the run's suites are not added); writes
    `eval/whitebox.json` in the run directory and returns the same document. `examples`:
    a number, ALL_EXAMPLES (the whole test split) or None (the run's eval.examples).
    """
    started = time.perf_counter()
    run = open_run(run_dir, device)
    cfg = run.cfg
    x, y = run.test_images()
    if suites is None:
        suites = cfg.eval.suites if attacks is None else ()
    attacks = tuple(cfg.eval.attacks if attacks is None else attacks)
    n = resolve_examples(examples, cfg.eval.examples)
    records = evaluate_whitebox(run.mixture(), x, y, attacks, examples=n, clean_repeats=cfg.eval.clean_repeats,
                                seed=cfg.seed, batch_size=cfg.eval.batch_size, progress=progress, large_eps=large_eps,
                                suites=tuple(suites), check_convergence=check_convergence)
    doc = {
        "kind": "white-box", "run": str(run.run_dir), "dataset": cfg.data.dataset,
        "dataset_display": run.dataset_display(), "method": cfg.train.method, "arch": cfg.model.label,
        "epoch": run.epoch, "device": str(run.device), "wall_time_s": time.perf_counter() - started,
        "results": records, "sanity": apply_sanity_checks(records),
    }
    write_eval_json(run.run_dir, "whitebox.json", doc)
    return doc
