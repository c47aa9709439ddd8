"""Attack throughput: images per second of PGD-10 (Linf) against a 3-member Mixture.

    python -m benchmarks.attacks --arch conv --members 3 --batch-size 256 --iters 5 [--device cuda] \
        [--impl phalanx|torchattacks]

Random CIFAR-shaped data (timing does not depend on pixel values). Prints one line per
iteration, then, as its last line, one JSON object with images_per_sec_median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from phalanx.attacks import pgd
from phalanx.memory import keep_freed_memory
from phalanx.models import InputSpec, Mixture, build_model

CIFAR = InputSpec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["conv", "conv3", "conv4", "resnet20"], default="conv")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impl", choices=["phalanx", "torchattacks"], default="phalanx",
                   help="whose PGD to time (torchattacks: pip install --no-deps torchattacks scipy)")
    args = p.parse_args(argv)
    keep_freed_memory()  # as the phalanx CLI does (phalanx/memory.py)
    if args.members < 1 or args.batch_size < 1 or args.iters < 1 or args.steps < 1:
        p.error("--members, --batch-size, --iters and --steps must be >= 1")
    device = torch.device(args.device)
    torch.manual_seed(0)
    mixture = Mixture([build_model(args.arch, CIFAR) for _ in range(args.members)]).to(device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(10, (args.batch_size,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.impl == "torchattacks":
        import torchattacks

        def attack(steps: int) -> torch.Tensor:
            return torchattacks.PGD(mixture, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)(x, y)
    else:
        def attack(steps: int) -> torch.Tensor:
            return pgd(mixture, x, y, eps=8 / 255, alpha=2 / 255, steps=steps, generator=gen)
    attack(1)  # warm-up
    rates = []
    for i in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        attack(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(args.batch_size / (time.perf_counter() - t))
        print(f"iter {i + 1}/{args.iters}: {rates[-1]:.1f} images/s")
    result = {"attack": f"pgd-linf-{args.steps}", "impl": args.impl, "arch": args.arch, "members": args.members,
              "batch_size": args.batch_size, "device": str(device), "threads": torch.get_num_threads(),
              "images_per_sec_median": round(statistics.median(rates), 1), "torch": torch.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
