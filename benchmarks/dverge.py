"""Time one DVERGE training iteration: the fast method against the plain (authors-style) loop.

    python -m benchmarks.dverge --arch conv --members 3 --batch-size 128 --iters 20 --impl fast

Random CIFAR-shaped data (3x32x32, 10 classes). Iteration k distills at the layer
layer_names[k * L // iters], so the iterations spread evenly over the L layers that DVERGE
draws uniformly per epoch and the mean is a fair per-iteration cost. Prints one progress line
per iteration, then, as the last line, one JSON object with the timings: wall time, and the
process's CPU time, which is less sensitive to other jobs on a shared machine (with one thread
it is close to the wall time the iteration would take on an idle core).

`--impl fast` is `phalanx.train.dverge.Dverge` as the training loop runs it (`--stack` sets its
`stack_members`); `--impl plain` is `benchmarks.dverge_reference`. Both run after
`phalanx.memory.keep_freed_memory()`, as the CLI does, unless `--no-malloc-tuning`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import statistics
import sys
import time

import torch

from phalanx.attacks.distillation import DistillConfig
from phalanx.memory import keep_freed_memory
from phalanx.models import Classifier, InputSpec, build_model
from phalanx.models.user import ModuleMember
from phalanx.train.api import Batch
from phalanx.train.dverge import Dverge, DvergeConfig
from benchmarks.dverge_reference import dverge_plain_step

CIFAR = InputSpec(channels=3, size=32, num_classes=10, mean=(0.4914, 0.4822, 0.4465),
                  std=(0.2470, 0.2435, 0.2616))
CIFAR_TRAIN_SIZE = 50_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dverge", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["conv", "resnet20", "user-conv"], default="conv",
                   help="user-conv: the seed Conv written as a user's plain nn.Module (UserLeNet), "
                        "tapped through phalanx.models.user.ModuleMember's forward hooks")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impl", choices=["fast", "plain"], default="fast")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast to bfloat16")
    p.add_argument("--distill-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--stack", choices=["auto", "always", "never"], default="auto",
                   help="DvergeConfig.stack_members for --impl fast")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's malloc as it is (phalanx's CLI applies phalanx.memory.keep_freed_memory)")
    args = p.parse_args(argv)
    if args.members < 2 or args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        p.error("need --members >= 2, --batch-size >= 1, --iters >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


class UserLeNet(torch.nn.Module):
    """The seed Conv's layers (conv 6@5x5, conv 16@5x5, FC 120, FC 84, FC 10) as a user writes them."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 6, 5), torch.nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(400, 120), torch.nn.Linear(120, 84), torch.nn.Linear(84, classes)
        self.pool, self.act = torch.nn.MaxPool2d(2), torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x))).flatten(1)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def make_member(arch: str) -> Classifier:
    if arch == "user-conv":
        return ModuleMember(UserLeNet(), CIFAR)
    return build_model(arch, CIFAR)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if not args.no_malloc_tuning:
        keep_freed_memory()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    members = [make_member(args.arch).to(device).train() for _ in range(args.members)]
    names = members[0].layer_names
    distill_cfg = DistillConfig(steps=args.distill_steps)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch_size, 3, 32, 32)
    pool = [Batch(torch.rand(shape, device=device), torch.randint(10, (args.batch_size,), device=device),
                  torch.rand(shape, device=device), torch.randint(10, (args.batch_size,), device=device))
            for _ in range(4)]

    if args.impl == "plain":
        optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in members]
    else:
        optimizer = torch.optim.SGD([p for m in members for p in m.parameters()], lr=1e-3, momentum=0.9)

    method = Dverge(DvergeConfig(distill=distill_cfg, stack_members=args.stack))

    def step(layer: str, batch: Batch) -> None:
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext())
        with amp:
            if args.impl == "plain":
                dverge_plain_step(members, optimizers, batch.x, batch.x_source, batch.y_source,
                                  layers=[layer] * len(members), cfg=distill_cfg, generator=gen)
                return
            method.layers = [layer] * len(members)  # what start_epoch's draw sets in a training run
            out = method.loss(members, batch, gen)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for k in range(args.warmup):
        step(names[-1], pool[k % len(pool)])
    sync()
    times, cpu_times = [], []
    for k in range(args.iters):
        layer = names[k * len(names) // args.iters]
        started, cpu_started = time.perf_counter(), time.process_time()
        step(layer, pool[k % len(pool)])
        sync()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        print(f"iter {k + 1}/{args.iters} layer {layer}: {times[-1]:.3f} s (cpu {cpu_times[-1]:.3f} s)",
              flush=True)

    mean = statistics.fmean(times)
    result = {
        "impl": args.impl, "arch": args.arch, "members": args.members, "batch_size": args.batch_size,
        "device": str(device), "amp": args.amp, "stack": args.stack if args.impl == "fast" else None,
        "malloc_tuning": not args.no_malloc_tuning, "iters": args.iters, "warmup": args.warmup,
        "distill_steps": args.distill_steps,
        "sec_per_iter_median": round(statistics.median(times), 4), "sec_per_iter_mean": round(mean, 4),
        # process CPU time (all threads): less sensitive than wall time to other jobs on the machine
        "cpu_sec_per_iter_mean": round(statistics.fmean(cpu_times), 4),
        "projected_cifar_epoch_s": round(mean * math.ceil(CIFAR_TRAIN_SIZE / args.batch_size), 1),
        "peak_mem_mb": round(peak_mem_mb(device), 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
