"""Evaluate a run directory and keep the results in it as JSON."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from phalanx.attacks import AttackSpec
from phalanx.config import RunConfig, SuiteConfig
from phalanx.data import dataset_info, load_dataset
from phalanx.errors import UsageError
from phalanx.eval.sanity import apply_sanity_checks
from phalanx.eval.whitebox import evaluate_whitebox
from phalanx.runs import load_members, write_eval_json
from phalanx.models import Mixture
from phalanx.device import resolve_device

T = TypeVar("T")
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
    run_dir = Path(run_dir)
    started = time.perf_counter()
    if device is not None:
        resolve_device(device)  # a bad --device is refused before anything is read
    members, cfg, meta = load_members(run_dir, "cpu")
    dev = resolve_device(device or cfg.device)
    mixture = Mixture([m.to(dev) for m in members]).eval()
    (x_u8, y), messages = loading(lambda: load_dataset(cfg.data.dataset, "test", cfg.data.root,
                                                       download=cfg.data.download,
                                                       allow_noncanonical=cfg.data.allow_noncanonical))
    x = x_u8.to(dev).float().div_(255)
    y = y.to(dev)
    if suites is None:
        suites = cfg.eval.suites if attacks is None else ()
    attacks = tuple(cfg.eval.attacks if attacks is None else attacks)
    n = resolve_examples(examples, cfg.eval.examples)
    records = evaluate_whitebox(mixture, x, y, attacks, examples=n, clean_repeats=cfg.eval.clean_repeats,
                                seed=cfg.seed, batch_size=cfg.eval.batch_size, progress=progress, large_eps=large_eps,
                                suites=tuple(suites), check_convergence=check_convergence)
    doc = {
        "kind": "white-box", "run": str(run_dir), "dataset": cfg.data.dataset,
        "dataset_display": display_name(cfg, messages), "method": cfg.train.method, "arch": cfg.model.label,
        "epoch": meta["epoch"], "device": str(dev), "wall_time_s": time.perf_counter() - started,
        "results": records, "sanity": apply_sanity_checks(records),
    }
    write_eval_json(run_dir, "whitebox.json", doc)
    return doc


def loading(load: Callable[[], T]) -> tuple[T, list[str]]:
    """`load()`'s result and the text of the warnings it gave (passed on): a loader's warnings name a
    non-canonical copy of the dataset, which `display_name` must say."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, [str(w.message) for w in caught]


def display_name(cfg: RunConfig, load_warnings: Sequence[str] = ()) -> str:
    """The dataset's name for tables; a non-canonical copy is never called by the plain name."""
    name = dataset_info(cfg.data.dataset, cfg.data.root).display_name
    if any("JPEG-decoded" in w for w in load_warnings):
        return f"{name} (JPEG-decoded copy)"
    if any("not the canonical" in w or "could not be verified" in w for w in load_warnings):
        return f"{name} (non-canonical copy)"
    return name
