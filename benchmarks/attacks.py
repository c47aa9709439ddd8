"""Attack throughput: images per second of PGD (Linf) against a Mixture, phalanx next to torchattacks.

    python -m benchmarks.attacks [--arch conv] [--members 3] [--batch-size 256] [--iters 5] [--warmup 1]
        [--impl IMPL ...] [--data-root DIR | --random-data] [--jsonl FILE] [--markdown]
        [--threads N] [--device cuda]

IMPL (all four by default; torchattacks' two are left out, with a note, when it is not installed):
- `phalanx-stacked`: `phalanx.attacks.pgd` on `Mixture(members, stacked=True)`: the members run as
  one stacked network (models/stacked.py);
- `phalanx-per-member`: the same on `Mixture(members, stacked=False)`: one call per member;
- `torchattacks`: `torchattacks.PGD` on `Mixture(members, stacked=False)`, i.e. on an ensemble
  module as plain PyTorch code would write it: the baseline;
- `torchattacks-stacked`: `torchattacks.PGD` on the stacked Mixture, which separates what the
  model's speed-up gives from what the attack loop gives.
Also: `phalanx`, on `Mixture(members)` as `phalanx.load_run` builds it (stacked when the
architecture `prefers_stacking`), and `torchattacks-per-member`, the same as `torchattacks`.

All attack the same members (freshly initialized: timing does not depend on the weights, and PGD
runs all its steps) with eps 8/255, step 2/255 and a random start. After `--warmup` untimed
attacks each, the implementations take turns, `--iters` timed attacks each, so that a change
in the machine's load hits all of them alike. Inputs: the first `--batch-size` CIFAR-10 test
images when a copy is found (`--data-root`; by default ../shared/data next to the repository,
if it holds one), else uniform random pixels (`--random-data`).

Prints one line per timed attack and one summary line per implementation (median images/s and
the ratio to `torchattacks`), then, as its last line, one JSON object with everything needed to
rerun it. `--jsonl FILE` appends that object to FILE as one line; `--markdown` prints a Markdown
table of the summary before it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from phalanx.attacks import pgd
from phalanx.data import NoncanonicalDataWarning, load_dataset
from phalanx.memory import keep_freed_memory
from phalanx.models import InputSpec, Mixture, build_model

CIFAR = InputSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
EPS, ALPHA = 8 / 255, 2 / 255
IMPLS = ("phalanx-stacked", "phalanx-per-member", "torchattacks", "torchattacks-stacked")
EXTRA_IMPLS = ("phalanx",)
ALIASES = {"torchattacks-per-member": "torchattacks"}
BASELINE = "torchattacks"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["conv", "conv3", "conv4", "resnet20"], default="conv")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed attacks per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed attacks per implementation first")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--impl", action="append", choices=[*IMPLS, *EXTRA_IMPLS, *ALIASES],
                   help="implementation to time (repeatable; default: all; torchattacks: "
                        "pip install --no-deps torchattacks scipy)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-root", type=Path, default=None,
                      help=f"where CIFAR-10 lies (default: {SHARED_DATA} when it holds a copy, "
                           "else random pixels)")
    data.add_argument("--random-data", action="store_true",
                      help="uniform random pixels, whatever data exists")
    p.add_argument("--jsonl", type=Path, default=None, help="append the result as one JSON line to this file")
    p.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.members < 1 or args.batch_size < 1 or args.iters < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--members, --batch-size, --iters and --steps must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.jsonl is not None and not args.jsonl.parent.is_dir():
        p.error(f"--jsonl {args.jsonl}: folder {args.jsonl.parent} does not exist")
    has_torchattacks = _version("torchattacks") is not None
    if args.impl:
        args.impl = list(dict.fromkeys(ALIASES.get(i, i) for i in args.impl))
        if not has_torchattacks and any(i.startswith("torchattacks") for i in args.impl):
            p.error("torchattacks is not installed (pip install --no-deps torchattacks scipy)")
    else:
        args.impl = [i for i in IMPLS if (has_torchattacks or not i.startswith("torchattacks"))
                     and (args.members > 1 or not i.endswith("-stacked"))]
        if not has_torchattacks:
            print("note: torchattacks is not installed; timing phalanx only", flush=True)
    if args.members < 2 and any(i.endswith("-stacked") for i in args.impl):
        p.error(f"{', '.join(i for i in args.impl if i.endswith('-stacked'))} need --members >= 2")
    if args.data_root is not None and not args.data_root.exists():
        p.error(f"--data-root {args.data_root} does not exist")
    return args


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo (what lscpu reads) names it: model name, family and model, core count."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return f"{name}, {os.cpu_count()} logical CPUs"


def load_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x in [0, 1], y, a description of where they came from)."""
    root = args.data_root
    if root is None and not args.random_data and (SHARED_DATA / "cifar10-jpeg-decoded").is_dir():
        root = SHARED_DATA
    if root is None:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.rand(args.batch_size, 3, 32, 32, generator=g)
        y = torch.randint(10, (args.batch_size,), generator=g)
        return x.to(device), y.to(device), "random pixels"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoncanonicalDataWarning)
        x_u8, y = load_dataset("cifar10", "test", root, allow_noncanonical=True)
    if len(y) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is more than the {len(y)} CIFAR-10 test images")
    canonical = not any(issubclass(w.category, NoncanonicalDataWarning) for w in caught)
    what = "CIFAR-10" if canonical else "CIFAR-10 (non-canonical copy, e.g. the JPEG-decoded one)"
    x = x_u8[: args.batch_size].float().div_(255)
    where = f"{what} test images 0-{args.batch_size - 1} from {root}"
    return x.to(device), y[: args.batch_size].to(device), where


def make_attacks(args: argparse.Namespace, members: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                 device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One zero-argument attack per implementation, each on its own Mixture of the same members."""
    stacked = Mixture(members, stacked=True).to(device).eval() if args.members > 1 else None
    per_member = Mixture(members, stacked=False).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def phalanx_pgd(model: Mixture) -> Callable[[], torch.Tensor]:
        return lambda: pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=args.steps, generator=gen)

    def torchattacks_pgd(model: Mixture) -> Callable[[], torch.Tensor]:
        import torchattacks

        attack = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=args.steps, random_start=True)
        return lambda: attack(x, y)

    builders = {"phalanx": lambda: phalanx_pgd(Mixture(members).to(device).eval()),
                "phalanx-stacked": lambda: phalanx_pgd(stacked),
                "phalanx-per-member": lambda: phalanx_pgd(per_member),
                "torchattacks": lambda: torchattacks_pgd(per_member),
                "torchattacks-stacked": lambda: torchattacks_pgd(stacked)}
    return {name: builders[name]() for name in args.impl}


def markdown_table(doc: dict[str, object]) -> str:
    lines = ["| implementation | images/s (median) | min - max | s per attack (median) | vs torchattacks |",
             "|---|---|---|---|---|"]
    for r in doc["results"]:
        ratio = f"{r['vs_torchattacks']:.2f}x" if r.get("vs_torchattacks") is not None else "—"
        lines.append(f"| {r['impl']} | {r['images_per_sec_median']:.1f} | {r['images_per_sec_min']:.1f} - "
                     f"{r['images_per_sec_max']:.1f} | {r['sec_per_attack_median']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    keep_freed_memory()  # as the phalanx CLI does (phalanx/memory.py)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the members, and torchattacks' random starts
    members = [build_model(args.arch, CIFAR) for _ in range(args.members)]
    x, y, data = load_inputs(args, device)
    attacks = make_attacks(args, members, x, y, device)

    def timed(attack: Callable[[], torch.Tensor]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        attack()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    load_before = os.getloadavg()
    for attack in attacks.values():
        for _ in range(args.warmup):
            attack()
    seconds: dict[str, list[float]] = {name: [] for name in attacks}
    for k in range(args.iters):
        for name, attack in attacks.items():
            seconds[name].append(timed(attack))
            rate = args.batch_size / seconds[name][-1]
            print(f"round {k + 1}/{args.iters} {name:21s} {rate:8.1f} images/s", flush=True)
    load_after = os.getloadavg()

    results = []
    for name, times in seconds.items():
        rates = [args.batch_size / t for t in times]
        results.append({"impl": name, "images_per_sec_median": round(statistics.median(rates), 1),
                        "images_per_sec_min": round(min(rates), 1),
                        "images_per_sec_max": round(max(rates), 1),
                        "sec_per_attack_median": round(statistics.median(times), 4), "repeats": len(times)})
    base = next((r["images_per_sec_median"] for r in results if r["impl"] == BASELINE), None)
    for r in results:
        r["vs_torchattacks"] = round(r["images_per_sec_median"] / base, 2) if base else None
        ratio = f"  {r['vs_torchattacks']:.2f}x torchattacks" if base else ""
        print(f"{r['impl']:21s} {r['images_per_sec_median']:8.1f} images/s (median of {r['repeats']}){ratio}",
              flush=True)
    doc = {"attack": f"pgd-linf-{args.steps}", "eps": round(EPS, 6), "alpha": round(ALPHA, 6),
           "random_start": True, "arch": args.arch, "members": args.members, "batch_size": args.batch_size,
           "data": data, "warmup": args.warmup, "iters": args.iters, "device": str(device),
           "threads": torch.get_num_threads(), "cpu": cpu_model(),
           "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
           "torch": torch.__version__, "torchattacks": _version("torchattacks"),
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "results": results}
    if args.markdown:
        print(markdown_table(doc), flush=True)
    line = json.dumps(doc)
    if args.jsonl is not None:
        with args.jsonl.open("a") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return doc


if __name__ == "__main__":
    main()
