"""Cross-check phalanx's PGD-Linf against an independent library (IBM ART) on a trained run.

    pip install --no-deps adversarial-robustness-toolbox six   # ART needs numpy, scipy, scikit-learn, tqdm
    python scripts/crosscheck_art.py RUN_DIR --eps 0.03 --alpha 0.007 --steps 10 --examples 500

Prints, for each member and the mixture, clean accuracy and PGD-Linf accuracy from phalanx and
from ART's ProjectedGradientDescentPyTorch on the same test examples; the last line is JSON.
A phalanx number well above ART's would mean our attack is weaker than it should be.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from crosscheck_common import crosscheck_args, run_and_examples

from phalanx.attacks import pgd
from phalanx.eval.whitebox import accuracy, named_models


def main() -> None:
    args = crosscheck_args(__doc__.splitlines()[0], examples=500)
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    mixture, x, y = run_and_examples(args.run_dir, args.examples)
    rows = []
    for name, model in named_models(mixture):
        ours = accuracy(model, pgd(model, x, y, eps=args.eps, alpha=args.alpha, steps=args.steps,
                                   generator=torch.Generator().manual_seed(0)), y)
        # CrossEntropyLoss on the mixture's log-probabilities equals its NLL: log_softmax(log p) = log p.
        est = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=cfg_classes(model, x), clip_values=(0.0, 1.0), device_type="cpu")
        attack = ProjectedGradientDescentPyTorch(est, norm=np.inf, eps=args.eps, eps_step=args.alpha,
                                                 max_iter=args.steps, num_random_init=1, batch_size=250, verbose=False)
        x_art = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
        theirs = accuracy(model, x_art, y)
        rows.append({"model": name, "clean": accuracy(model, x, y), "phalanx_pgd": ours, "art_pgd": theirs})
        print(f"{name:8s} clean {rows[-1]['clean']:.4f}  phalanx PGD {ours:.4f}  ART PGD {theirs:.4f}")
    print(json.dumps({"run": args.run_dir, "eps": args.eps, "alpha": args.alpha, "steps": args.steps,
                      "examples": len(y), "rows": rows}))


def cfg_classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


if __name__ == "__main__":
    main()
