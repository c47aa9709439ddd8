"""Cross-check phalanx's AutoAttack `standard` suite against the authors' AutoAttack code on a trained run.

    python scripts/crosscheck_autoattack.py RUN_DIR --eps 0.1 [--norm linf|l2] [--examples N] [--models all]
        [--oracle ../shared/oracles/auto-attack]

The reference code is imported from `--oracle` (a checkout of fra31/auto-attack; never part of
phalanx). For each model (the mixture, or every member too with `--models all`) it prints clean
accuracy, robust accuracy under our suite and under the reference (same examples), our ensemble
suite's worst case (mixture only) and the per-example worst case over both of our suites, with the
wall time of each. The last line is JSON. `tests/eval/test_suites_reference.py` asserts agreement
within 1 point on small trained ensembles.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from crosscheck_common import run_and_examples

from phalanx.eval.measure import correct_mask
from phalanx.eval.suites import applies_to, robust_after, run_suite
from phalanx.eval.whitebox import named_models

DEFAULT_ORACLE = Path(__file__).resolve().parents[1].parent / "shared" / "oracles" / "auto-attack"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--examples", type=int, help="the first N test examples (default: all)")
    p.add_argument("--models", choices=["mixture", "all"], default="mixture")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--oracle", type=Path, default=DEFAULT_ORACLE, help="folder holding the autoattack package")
    args = p.parse_args()
    if not (args.oracle / "autoattack").is_dir():
        sys.exit(f"crosscheck_autoattack: no autoattack package under {args.oracle} (give --oracle)")
    sys.path.insert(0, str(args.oracle))
    from autoattack import AutoAttack

    mixture, x, y = run_and_examples(args.run_dir, args.examples or 10**9)
    rows = []
    for name, model in named_models(mixture):
        if args.models == "mixture" and name != "mixture":
            continue
        clean = correct_mask(model, x, y)
        started = time.perf_counter()
        ours = robust_after(run_suite(model, x, y, "autoattack", eps=args.eps, norm=args.norm, clean_correct=clean,
                                      batch_size=args.batch_size), clean)
        ours_s = time.perf_counter() - started
        adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=args.eps,
                               version="standard", device=str(x.device), seed=0)
        started = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            x_adv = adversary.run_standard_evaluation(x, y, bs=args.batch_size)
        ref_s = time.perf_counter() - started
        row = {"model": name, "n": len(y), "clean": float(clean.float().mean()),
               "phalanx_autoattack": float(ours.float().mean()),
               "reference_autoattack": float(correct_mask(model, x_adv, y).float().mean()),
               "phalanx_s": ours_s, "reference_s": ref_s}
        if applies_to("ensemble", model):
            ensemble = robust_after(run_suite(model, x, y, "ensemble", eps=args.eps, norm=args.norm,
                                              clean_correct=clean, batch_size=args.batch_size), clean)
            row["phalanx_ensemble"] = float(ensemble.float().mean())
            row["phalanx_worst_case"] = float((ensemble & ours).float().mean())
        rows.append(row)
        extra = (f"  ensemble suite {row['phalanx_ensemble']:.4f}  worst case {row['phalanx_worst_case']:.4f}"
                 if "phalanx_ensemble" in row else "")
        print(f"{name:8s} n {len(y)} clean {row['clean']:.4f}  AutoAttack phalanx {row['phalanx_autoattack']:.4f} "
              f"({ours_s:.1f} s) / reference {row['reference_autoattack']:.4f} ({ref_s:.1f} s){extra}", flush=True)
    print(json.dumps({"run": args.run_dir, "eps": args.eps, "norm": args.norm, "rows": rows}))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
