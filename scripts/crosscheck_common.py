"""What the cross-check scripts share: their arguments, and a run's mixture with its test examples."""

from __future__ import annotations

import argparse

import torch

from phalanx.attacks import madry_step
from phalanx.models import Mixture
from phalanx.runs import open_run


def crosscheck_args(description: str, examples: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("run_dir")
    p.add_argument("--eps", type=float, default=0.03)
    p.add_argument("--alpha", type=float, help="PGD step (default 2.5 * eps / steps, Madry et al.)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--examples", type=int, default=examples)
    args = p.parse_args()
    if args.alpha is None:
        args.alpha = madry_step(args.eps, args.steps)
    return args


def run_and_examples(run_dir: str, examples: int) -> tuple[Mixture, torch.Tensor, torch.Tensor]:
    """The run's mixture and its first `examples` test images in [0, 1] with their labels."""
    run = open_run(run_dir, "cpu")
    x, y = run.test_images(examples)
    return run.mixture(), x, y
