"""Our FGSM and PGD against torchattacks' on the same trained model (skipped where it is not installed).

torchattacks declares torchvision as a dependency but imports none of it; `make test` installs
it with --no-deps (see the Makefile), so this runs in CI.
"""

import pytest
import torch

from phalanx.attacks import fgsm, pgd
from phalanx.config import load_config
from phalanx.data import load_dataset
from phalanx.eval.whitebox import accuracy, named_models
from phalanx.runs import load_run
from phalanx.train.loop import train

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(None, ["data.dataset=digits", "model.members=2", "train.epochs=4", "train.batch_size=64",
                             "optim.name=adam", "optim.lr=0.003", "device=cpu"])
    mixture = load_run(train(cfg, tmp_path_factory.mktemp("run") / "run", progress=False))
    x_u8, y = load_dataset("digits", "test")
    return mixture, x_u8.float() / 255, y


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_fgsm_and_pgd_match_torchattacks_within_one_point(trained, eps):
    mixture, x, y = trained
    x5, y5 = x.repeat(5, 1, 1, 1), y.repeat(5)
    torch.manual_seed(0)  # torchattacks draws its random start from the global generator
    for name, model in named_models(mixture):
        clean = accuracy(model, x, y)
        cases = {
            "fgsm": (fgsm(model, x, y, eps=eps), torchattacks.FGSM(model, eps=eps)(x, y)),
            "pgd, no random start": (
                pgd(model, x, y, eps=eps, alpha=eps / 8, steps=20, random_start=False),
                torchattacks.PGD(model, eps=eps, alpha=eps / 8, steps=20, random_start=False)(x, y)),
            # random starts: 5 draws per image, so that their noise (not the attacks) stays below a point
            "pgd, random start": (
                pgd(model, x5, y5, eps=eps, alpha=eps / 8, steps=20, generator=torch.Generator().manual_seed(0)),
                torchattacks.PGD(model, eps=eps, alpha=eps / 8, steps=20, random_start=True)(x5, y5)),
        }
        for attack, (ours, theirs) in cases.items():
            xs, ys = (x5, y5) if len(ours) == len(y5) else (x, y)
            assert (ours - xs).abs().max() <= eps + 1e-6 and (theirs - xs).abs().max() <= eps + 1e-6
            a, b = accuracy(model, ours, ys), accuracy(model, theirs, ys)
            assert abs(a - b) <= 0.01, f"{name} {attack} eps {eps}: phalanx {a:.4f}, torchattacks {b:.4f}"
            assert a < clean - 0.05, f"{name} {attack} eps {eps}: the attack barely works ({clean:.3f} -> {a:.3f})"
