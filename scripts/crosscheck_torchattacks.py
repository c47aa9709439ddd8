"""Cross-check phalanx's FGSM and PGD-Linf against torchattacks on a trained run.

    pip install --no-deps torchattacks==3.5.1 scipy   # torchattacks declares torchvision but never imports it
    python scripts/crosscheck_torchattacks.py RUN_DIR --eps 0.03 --alpha 0.007 --steps 10 --examples 1000

Prints, for each member and the mixture, clean accuracy and FGSM / PGD-Linf accuracy from phalanx
and from torchattacks on the same test examples (PGD with a random start in both); the last line
is JSON. `tests/eval/test_crosscheck_torchattacks.py` asserts agreement within 1 point.
"""

from __future__ import annotations

import json

import torch
from crosscheck_common import crosscheck_args, run_and_examples

from phalanx.attacks import fgsm, pgd
from phalanx.eval.whitebox import accuracy, named_models


def main() -> None:
    args = crosscheck_args(__doc__.splitlines()[0], examples=1000)
    import torchattacks

    mixture, x, y = run_and_examples(args.run_dir, args.examples)
    torch.manual_seed(0)  # torchattacks' random start uses the global generator
    rows = []
    for name, model in named_models(mixture):
        row = {"model": name, "clean": accuracy(model, x, y),
               "phalanx_fgsm": accuracy(model, fgsm(model, x, y, eps=args.eps), y),
               "torchattacks_fgsm": accuracy(model, torchattacks.FGSM(model, eps=args.eps)(x, y), y),
               "phalanx_pgd": accuracy(model, pgd(model, x, y, eps=args.eps, alpha=args.alpha, steps=args.steps,
                                                  generator=torch.Generator().manual_seed(0)), y),
               "torchattacks_pgd": accuracy(model, torchattacks.PGD(model, eps=args.eps, alpha=args.alpha,
                                                                    steps=args.steps)(x, y), y)}
        rows.append(row)
        print(f"{name:8s} clean {row['clean']:.4f}  FGSM phalanx {row['phalanx_fgsm']:.4f} / torchattacks "
              f"{row['torchattacks_fgsm']:.4f}  PGD phalanx {row['phalanx_pgd']:.4f} / torchattacks "
              f"{row['torchattacks_pgd']:.4f}", flush=True)
    print(json.dumps({"run": args.run_dir, "eps": args.eps, "alpha": args.alpha, "steps": args.steps,
                      "examples": len(y), "rows": rows}))


if __name__ == "__main__":
    main()
