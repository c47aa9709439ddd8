import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

# One intra-op thread: the suite's tensors are small, and on a shared 2-core machine torch's
# spinning OpenMP workers made tests up to 30x slower (measured while other jobs ran).
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ORACLE = SHARED / "oracles" / "auto-attack"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def reference_autoattack() -> Iterator[ModuleType]:
    """The authors' AutoAttack package (../shared/oracles/auto-attack), imported for tests only;
    skipped where it is absent (a user's clone has no ../shared)."""
    if not ORACLE.is_dir():
        pytest.skip("reference AutoAttack not available (../shared/oracles/auto-attack)")
    sys.path.insert(0, str(ORACLE))
    try:
        import autoattack
        yield autoattack
    finally:
        sys.path.remove(str(ORACLE))


def _trained_ensemble(tmp_dir: Path, overrides: list[str], dataset: str, root: str | None, examples: int):
    from phalanx.config import load_config
    from phalanx.runs import open_run
    from phalanx.train.loop import train

    cfg = load_config(None, overrides)
    run = open_run(train(cfg, tmp_dir / "run", progress=False), "cpu")
    assert (run.cfg.data.dataset, run.cfg.data.root) == (dataset, root)
    x, y = run.test_images(examples)
    return run.mixture(), x, y


@pytest.fixture(scope="session")
def digits_ensemble(tmp_path_factory):
    """(Mixture of 3 trained seed-Conv members, x, y): 200 embedded-digits test images in [0, 1]."""
    return _trained_ensemble(tmp_path_factory.mktemp("digits"), [
        "data.dataset=digits", "model.members=3", "train.epochs=6", "train.batch_size=64",
        "optim.name=adam", "optim.lr=0.003", "device=cpu", "seed=0"], "digits", None, 200)


@pytest.fixture(scope="session")
def cifar_ensemble(tmp_path_factory):
    """(Mixture of 3 seed-Conv members trained 3 epochs on 5,000 CIFAR-10 images, x, y): 200 test
    images. Skipped where ../shared/data is absent."""
    if not (SHARED_DATA / "cifar10-jpeg-decoded").is_dir():
        pytest.skip("CIFAR-10 not available (../shared/data)")
    root = str(SHARED_DATA)
    return _trained_ensemble(tmp_path_factory.mktemp("cifar"), [
        "data.dataset=cifar10", f"data.root={root}", "data.allow_noncanonical=true", "data.train_subset=5000",
        "model.members=3", "train.epochs=3", "train.batch_size=64", "optim.name=adam", "optim.lr=0.002",
        "device=cpu", "seed=0"], "cifar10", root, 200)


@pytest.fixture
def straight_and_resumed(tmp_path, monkeypatch):
    """A function of a RunConfig: trains it uninterrupted, and again killed at its third save (mid
    epoch 2 with `train.checkpoint_every_steps` set) then resumed; returns both run directories."""
    from phalanx.checkpoint import latest_checkpoint
    from phalanx.train import loop

    def run(cfg):
        straight = loop.train(cfg, tmp_path / "straight", progress=False)
        real_save, calls = loop._save, {"n": 0}

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        monkeypatch.setattr(loop, "_save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            loop.train(cfg, tmp_path / "resumed", progress=False)
        monkeypatch.setattr(loop, "_save", real_save)
        assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").meta["batch"] > 0  # died mid-epoch
        return straight, loop.train(cfg, tmp_path / "resumed", progress=False)

    return run
