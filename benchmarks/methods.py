"""Time one training step of each method: method.loss + backward + optimizer step, as the loop runs it.

    python -m benchmarks.methods --arch conv --members 3 --batch-size 128 --iters 10 [--method gal ...]

Random CIFAR-shaped data (3x32x32, 10 classes): timing does not depend on pixel values.
Each method uses its config's defaults (the papers' parameters); teachers and static models
(RRM, KD, EnsAdv) are freshly built models of the same architecture, frozen, so the benchmark
needs no other run. Prints one line per method, then, as its last line, one JSON object:
{"results": [{"method", "sec_per_iter_median", "vs_baseline", ...}, ...], ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.dverge import CIFAR
from phalanx.config import OptimConfig
from phalanx.memory import keep_freed_memory
from phalanx.models import Classifier, build_model
from phalanx.train.adp import Adp, AdpConfig
from phalanx.train.adversarial import Adversarial, AdversarialConfig
from phalanx.train.api import Batch
from phalanx.train.baseline import Baseline, BaselineConfig
from phalanx.train.dverge import Dverge, DvergeAdvtConfig, DvergeConfig
from phalanx.runs import frozen
from phalanx.train.ensadv import EnsAdv, EnsAdvConfig, EnsAdvGalConfig
from phalanx.train.gal import Gal, GalConfig
from phalanx.train.gdr import Gdr, GdrConfig
from phalanx.train.kd import Kd, KdConfig
from phalanx.train.optimization import make_optimizer
from phalanx.train.rrm import Rrm, RrmConfig
from phalanx.train.trs import Trs, TrsConfig


def _frozen(arch: str) -> nn.Module:
    return frozen(build_model(arch, CIFAR))


# name -> builder of the method from the architecture (teachers and static models built fresh)
METHODS: dict[str, Callable[[str], object]] = {
    "baseline": lambda arch: Baseline(BaselineConfig()),
    "gal": lambda arch: Gal(GalConfig()),
    # GAL without the paper's noisy copy of the batch (which doubles the data): the cost of the
    # double back-propagation alone, at the baseline's batch
    "gal-no-noise": lambda arch: Gal(GalConfig(noise_eps=0.0)),
    "gdr": lambda arch: Gdr(GdrConfig()),
    "trs": lambda arch: Trs(TrsConfig()),
    "adp": lambda arch: Adp(AdpConfig()),
    "adversarial-pgd": lambda arch: Adversarial(AdversarialConfig(mode="pgd")),
    "adversarial-fgsm-rs": lambda arch: Adversarial(AdversarialConfig(mode="fgsm-rs")),
    "ensadv": lambda arch: EnsAdv(EnsAdvConfig(static_runs=("bench",)), static_models=[_frozen(arch)]),
    "ensadv+gal": lambda arch: EnsAdv(EnsAdvGalConfig(static_runs=("bench",)), static_models=[_frozen(arch)]),
    "rrm": lambda arch: Rrm(RrmConfig(teacher_run="bench"), teacher=_frozen(arch)),
    "kd": lambda arch: Kd(KdConfig(teacher_run="bench"), teacher=_frozen(arch)),
    "dverge": lambda arch: Dverge(DvergeConfig()),
    "dverge-advt": lambda arch: Dverge(DvergeAdvtConfig()),
}


def time_method(name: str, arch: str, members: int, batch_size: int, iters: int, warmup: int,
                device: torch.device, seed: int) -> dict[str, object]:
    """Median and mean seconds of `iters` training steps of method `name` (after `warmup` steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GAL's "ReLU member" warning: the timing is the point here
        return _time_method(name, arch, members, batch_size, iters, warmup, device, seed)


def _time_method(name: str, arch: str, members: int, batch_size: int, iters: int, warmup: int,
                 device: torch.device, seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    models: list[Classifier] = [build_model(arch, CIFAR).to(device).train() for _ in range(members)]
    method = METHODS[name](arch)
    extra = list(method.extra_parameters(models)) if hasattr(method, "extra_parameters") else []
    optimizer = make_optimizer(models, OptimConfig(name="sgd", lr=1e-3, momentum=0.9), extra)
    gen = torch.Generator(device=device).manual_seed(seed)
    method.start_epoch(0, models, gen)
    shape = (batch_size, 3, 32, 32)
    batches = [Batch(torch.rand(shape, device=device), torch.randint(10, (batch_size,), device=device),
                     torch.rand(shape, device=device), torch.randint(10, (batch_size,), device=device))
               for _ in range(2)]

    def step(batch: Batch) -> None:
        out = method.loss(models, batch, gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for k in range(warmup):
        step(batches[k % 2])
    times = []
    for k in range(iters):
        if name.startswith("dverge"):
            method.start_epoch(k, models, gen)  # a fresh layer draw, as every epoch
        started = time.perf_counter()
        step(batches[k % 2])
        times.append(time.perf_counter() - started)
    return {"method": name, "sec_per_iter_median": round(statistics.median(times), 4),
            "sec_per_iter_mean": round(statistics.fmean(times), 4)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.splitlines()[0])
    p.add_argument("--method", action="append", choices=list(METHODS),
                   help="method to time (repeatable; default: all); baseline is always timed first")
    p.add_argument("--arch", choices=["conv", "conv3", "conv4", "resnet20"], default="conv")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the phalanx CLI does (phalanx/memory.py)
    if args.members < 2 or args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        p.error("need --members >= 2 (DVERGE, GAL and GDR compare members), --batch-size >= 1, "
                "--iters >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ["baseline", *[m for m in (args.method or METHODS) if m != "baseline"]]
    results = []
    for name in names:
        r = time_method(name, args.arch, args.members, args.batch_size, args.iters, args.warmup, device, args.seed)
        r["vs_baseline"] = round(r["sec_per_iter_median"] / results[0]["sec_per_iter_median"], 2) if results else 1.0
        results.append(r)
        print(f"{name:20s} {r['sec_per_iter_median']:.4f} s/iter (median)  {r['vs_baseline']:.2f}x baseline",
              flush=True)
    doc = {"arch": args.arch, "members": args.members, "batch_size": args.batch_size, "iters": args.iters,
           "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "results": results}
    print(json.dumps(doc), flush=True)
    return doc


if __name__ == "__main__":
    main()
