"""AutoAttack's standard suite: phalanx's (`--suite autoattack`) against the authors' code, same model, same images.

    python -m benchmarks.suite RUN_DIR [--eps 0.0314] [--norm linf] [--examples 1000] [--batch-size 500]
        [--oracle ../shared/oracles/auto-attack] [--jsonl FILE]

Attacks the mixture of a trained run (a benchmark on untrained weights would be meaningless here:
how long AutoAttack runs depends on how many points survive each stage) with our suite, then with
the reference AutoAttack (`version='standard'`, imported from `--oracle`, never part of phalanx),
on the first `--examples` test images, `--repeats` times each, alternating. Prints each run's wall time and robust accuracy, the
speed ratio, and, as its last line, one JSON object (appended to `--jsonl` when given) with the
CPU, threads and load so that the numbers can be compared and rerun.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

import phalanx
from benchmarks.attacks import cpu_model
from phalanx.data import load_dataset
from phalanx.eval.measure import correct_mask
from phalanx.eval.suites import robust_after, run_suite
from phalanx.memory import keep_freed_memory
from phalanx.runs import read_run_config

ORACLE = Path(__file__).resolve().parents[1].parent / "shared" / "oracles" / "auto-attack"


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--oracle", type=Path, default=ORACLE, help="folder holding the autoattack package")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating (median reported)")
    p.add_argument("--jsonl", type=Path, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if not (args.oracle / "autoattack").is_dir():
        p.error(f"no autoattack package under {args.oracle} (give --oracle)")
    sys.path.insert(0, str(args.oracle))
    from autoattack import AutoAttack

    keep_freed_memory()
    cfg = read_run_config(args.run_dir)
    mixture = phalanx.load_run(args.run_dir)
    x_u8, y = load_dataset(cfg.data.dataset, "test", cfg.data.root, allow_noncanonical=cfg.data.allow_noncanonical)
    x, y = x_u8[:args.examples].float() / 255, y[:args.examples]
    clean = correct_mask(mixture, x, y, args.batch_size)

    adversary = AutoAttack(mixture, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=args.eps, version="standard",
                           device=str(x.device), seed=0)
    ours_times, ref_times = [], []
    for r in range(args.repeats):  # alternate, so that a change in the machine's load hits both alike
        started = time.perf_counter()
        stages = run_suite(mixture, x, y, "autoattack", eps=args.eps, norm=args.norm, clean_correct=clean,
                           batch_size=args.batch_size)
        ours_times.append(time.perf_counter() - started)
        ours = float(robust_after(stages, clean).float().mean())
        print(f"[{r + 1}/{args.repeats}] phalanx --suite autoattack: {ours_times[-1]:7.1f} s, robust accuracy "
              f"{100 * ours:.2f}% ({', '.join(f'{s.spec.name.value} {s.wall_time_s:.1f} s' for s in stages)})",
              flush=True)
        started = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            x_adv = adversary.run_standard_evaluation(x, y, bs=args.batch_size)
        ref_times.append(time.perf_counter() - started)
        ref = float(correct_mask(mixture, x_adv, y, args.batch_size).float().mean())
        print(f"[{r + 1}/{args.repeats}] reference AutoAttack:       {ref_times[-1]:7.1f} s, robust accuracy "
              f"{100 * ref:.2f}%", flush=True)
    ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
    print(f"median: phalanx {ours_s:.1f} s, reference {ref_s:.1f} s: phalanx is {ref_s / ours_s:.2f}x the "
          f"reference's speed")
    doc = {"benchmark": "suite-autoattack", "run": args.run_dir, "arch": cfg.model.arch, "members": len(mixture),
           "stacked": mixture.runs_stacked(), "dataset": cfg.data.dataset, "examples": len(y), "eps": args.eps,
           "norm": args.norm, "clean": float(clean.float().mean()), "phalanx_s": ours_s, "reference_s": ref_s,
           "phalanx_times_s": ours_times, "reference_times_s": ref_times,
           "speedup": ref_s / ours_s, "phalanx_robust": ours, "reference_robust": ref, "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(doc))
    if args.jsonl is not None:
        with args.jsonl.open("a") as f:
            f.write(json.dumps(doc) + "\n")
    return doc


if __name__ == "__main__":
    main()
