"""The black-box transfer protocol of the GAL paper (section 4.1): attack a surrogate S, keep its
adversarial examples, and measure a target T's accuracy on them.

A surrogate is the members of one or more runs; the attacks ascend the AVERAGE loss of all its
models ("we consider the average CE loss of all the models in S as the objective"), which differs
from attacking the Mixture's log-mean-softmax (`surrogate_loss="mixture"` does that instead).

A transfer set is `transfer-<hash>.safetensors` (float32 images: eps steps such as 0.03 are not
multiples of 1/255, and float16's spacing near 1 (~5e-4) would push perturbations past eps) plus
a JSON sidecar with the exact command, the surrogate runs, the attacks, seed, example indices and
dataset. The hash covers every parameter that changes the examples, so asking again for the same
set reuses the file without attacking. The sidecar also records the tensor file's size and SHA-256:
a damaged set is refused by name when loaded, and crafted again (with a warning) when asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from phalanx.attacks import AttackName, AttackSpec, run_attack
from phalanx.attacks.core import Loss, per_example_loss
from phalanx.errors import UsageError
from phalanx.eval.sanity import apply_sanity_checks, check_whitebox_below_transfer
from phalanx.eval.stats import add_ci95
from phalanx.eval.whitebox import correct_mask, max_perturbation, named_models, strongest_records
from phalanx.files import (
    DamagedFileError, DamagedFileWarning, loads_checked, read_json, write_bytes_atomic, write_json_atomic,
)
from phalanx.models import Mixture
from phalanx.runs import eval_dir, open_run, write_eval_json

FORMAT = "phalanx-transfer-set/1"


def _gal(eps: tuple[float, float]) -> tuple[AttackSpec, ...]:
    """FGSM, R-FGSM, I-FGSM, MI-FGSM, PGD-CW at two eps, with the paper's settings (registry defaults)."""
    names = (AttackName.FGSM, AttackName.R_FGSM, AttackName.I_FGSM, AttackName.MI_FGSM, AttackName.PGD_CW)
    return tuple(AttackSpec(name, e) for e in eps for name in names)


GAL_TRANSFER_ATTACKS: dict[str, tuple[AttackSpec, ...]] = {
    # Table 2: eps 0.03 / 0.09 for CIFAR-10, 0.1 / 0.3 for MNIST; Fashion-MNIST and the embedded
    # digits (both MNIST-like grey digits/items) take MNIST's.
    "cifar10": _gal((0.03, 0.09)),
    "mnist": _gal((0.1, 0.3)),
    "fashion-mnist": _gal((0.1, 0.3)),
    "digits": _gal((0.1, 0.3)),
    # Not in the paper: the colour sets take CIFAR-10's radii.
    "cifar100": _gal((0.03, 0.09)),
    "svhn": _gal((0.03, 0.09)),
    "image-folder": _gal((0.03, 0.09)),
}


AVERAGED_LOSSES = (Loss.CE, Loss.CW)  # the losses AverageLossSurrogate can average


class AverageLossSurrogate(nn.Module):
    """The surrogate whose attack loss is the average of its models' losses, for one batch of labels.

    Attacks ascend `per_example_loss(output, y)`; this module returns, for the labels `y` it was
    built with, an output on which that loss equals mean_i loss(f_i(x), y) exactly:
    - CE: class y gets -m (m the members' mean CE) and the other classes share the remaining
      probability 1 - exp(-m) equally, so log-softmax(output)_y = -m;
    - CW: class y gets 0 and every other class the members' mean margin max_{j != y} z_j - z_y.
    Its argmax is only meaningful as "the average loss says y is likely", so it suits attacks that
    only follow the gradient (the FGSM family, PGD, PGD-CW), not success-based best-iterate picking.
    """

    def __init__(self, members: Sequence[nn.Module], y: torch.Tensor, loss: Loss):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.y, self.loss = y, loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [m(x) for m in self.members]
        losses = torch.stack([per_example_loss(z, self.y, self.loss) for z in logits]).mean(0)[:, None]
        classes = logits[0].shape[1]
        onehot = nn.functional.one_hot(self.y, classes).bool()
        if self.loss is Loss.CW:
            return torch.where(onehot, torch.zeros_like(losses), losses.expand(-1, classes))
        # clamp: at a loss of exactly 0 the other classes' log(1 - exp(-m)) would be -inf
        rest = torch.log(-torch.expm1(-losses.clamp(min=1e-6))) - math.log(classes - 1)
        return torch.where(onehot, -losses, rest.expand(-1, classes))


def _attack_loss(spec: AttackSpec) -> Loss:
    """The loss an `AverageLossSurrogate` averages for `spec`: the one the attack ascends (its entry)."""
    loss = spec.loss()
    if loss not in AVERAGED_LOSSES:
        raise UsageError(f"attack {spec.name.value!r} cannot attack an average-loss surrogate (it ascends "
                         f"the {loss.value} loss); use a CE or CW attack")
    return loss


def describe_attack(spec: AttackSpec) -> dict[str, Any]:
    """An attack as transfer sets and their records name it: {attack, eps, params}."""
    return {"attack": spec.name.value, "eps": spec.eps, "params": spec.resolved_params()}


def _surrogate_identity(run_dir: Path) -> dict[str, Any]:
    """What identifies a surrogate run's weights: its resolved path and latest checkpoint."""
    from phalanx.checkpoint import latest_checkpoint
    from phalanx.runs import checkpoint_dir

    ckpt = latest_checkpoint(checkpoint_dir(run_dir))
    return {"run": str(run_dir.resolve()), "epoch": None if ckpt is None else ckpt.meta.get("epoch")}


def transfer_set_params(surrogate_run_dirs: Sequence[str | Path], attacks: Sequence[AttackSpec], *,
                        examples: int | None, seed: int, surrogate_loss: str = "average",
                        first: bool = False) -> dict[str, Any]:
    """Every parameter that determines a transfer set's content (hashed into its file name)."""
    from phalanx.runs import read_run_config

    dirs = [Path(d) for d in surrogate_run_dirs]
    if not dirs:
        raise UsageError("need at least one surrogate run directory")
    if surrogate_loss not in ("average", "mixture"):
        raise UsageError(f"surrogate_loss must be 'average' or 'mixture', got {surrogate_loss!r}")
    datasets = {read_run_config(d).data.dataset for d in dirs}
    if len(datasets) != 1:
        raise UsageError(f"surrogate runs must share one dataset, got {sorted(datasets)}")
    if not attacks:
        raise UsageError("need at least one attack")
    for spec in attacks:
        _attack_loss(spec)
    return {"format": FORMAT, "dataset": datasets.pop(), "split": "test", "examples": examples, "seed": seed,
            "surrogates": [_surrogate_identity(d) for d in dirs], "surrogate_loss": surrogate_loss,
            "dtype": "float32", "attacks": [describe_attack(s) for s in attacks],
            **({"selection": "first"} if first else {})}  # absent for a random draw: older sets keep their hash


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _select(n_total: int, examples: int | None, seed: int, first: bool = False) -> torch.Tensor:
    """Which test examples: a seeded random subset of `examples`, in increasing index order, or with
    `first` the first `examples` (those a white-box evaluation of `examples` attacks)."""
    if examples is None or examples >= n_total:
        return torch.arange(n_total)
    if first:
        return torch.arange(examples)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:examples].sort().values


def craft_on_surrogate(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                       specs: Sequence[AttackSpec], *, seed: int, batch_size: int = 500,
                       surrogate_loss: str = "average") -> list[torch.Tensor]:
    """The adversarial examples of each attack in `specs`, crafted on the surrogate made of `members`
    (in eval mode, on x's device): the average of their losses (`AverageLossSurrogate`), or with
    `surrogate_loss` "mixture" the loss of their averaged probabilities. Each attack draws from a
    generator seeded with `seed`."""
    mixture = Mixture(list(members)).eval()
    crafted = []
    for spec in specs:
        loss = _attack_loss(spec)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        out = torch.empty_like(x)
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            model = mixture if surrogate_loss == "mixture" else AverageLossSurrogate(members, yb, loss)
            out[i:i + batch_size] = run_attack(spec, model, xb, yb, gen)
        crafted.append(out)
    return crafted


def craft_transfer_set(surrogate_run_dirs: Sequence[str | Path], attacks: Sequence[AttackSpec], *,
                       examples: int | None, seed: int, out_path: str | Path, batch_size: int = 500,
                       device: str | None = None, command: str = "", surrogate_loss: str = "average",
                       first: bool = False) -> Path:
    """Craft (or reuse) the adversarial examples of `attacks` on the surrogate made of all members of
    `surrogate_run_dirs`, for `examples` test examples drawn with `seed` (with `first`, the first
    `examples`, as a white-box evaluation takes them); returns the .safetensors path.

    `out_path` is a directory; the set is `out_path/transfer-<hash>.safetensors` with its sidecar
    `.json`, the hash covering `transfer_set_params`. An existing complete set (its sidecar is
    written last) is returned as is, without attacking. `surrogate_loss` "average" ascends the
    average loss of all the models (the GAL protocol); "mixture" attacks their Mixture instead.
    `command` is recorded in the sidecar (the exact command line that made the set).
    """
    params = transfer_set_params(surrogate_run_dirs, attacks, examples=examples, seed=seed,
                                 surrogate_loss=surrogate_loss, first=first)
    digest = params_hash(params)
    out_dir = Path(out_path)
    path = out_dir / f"transfer-{digest}.safetensors"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        try:
            _read_verified(path)
            return path
        except TransferSetDamaged as exc:
            warnings.warn(f"{exc}; recrafting it", UserWarning, stacklevel=2)
    started = time.perf_counter()
    first_run = open_run(surrogate_run_dirs[0], device)
    dev = first_run.device
    members: list[nn.Module] = list(first_run.members)
    for d in surrogate_run_dirs[1:]:
        members += open_run(d, str(dev)).members
    test = first_run.test_split()
    idx = _select(len(test.labels), examples, seed, first)
    x = test.images[idx].to(dev).float().div_(255)
    y = test.labels[idx].to(dev)
    tensors: dict[str, torch.Tensor] = {"x": x.cpu().contiguous(), "y": y.cpu().contiguous(),
                                        "indices": idx.contiguous()}
    for k, out in enumerate(craft_on_surrogate(members, x, y, attacks, seed=seed, batch_size=batch_size,
                                               surrogate_loss=surrogate_loss)):
        tensors[f"adv.{k}"] = out.cpu().contiguous()
    blob = save_safetensors(tensors)
    write_bytes_atomic(path, blob)
    write_json_atomic(sidecar, {  # written last: the commit marker, with the checksum of the tensors
        **params, "hash": digest, "tensors_sha256": hashlib.sha256(blob).hexdigest(), "tensors_bytes": len(blob), "command": command, "surrogate_runs": [str(d) for d in surrogate_run_dirs],
        "surrogate_members": len(members), "indices": idx.tolist(), "n": len(idx),
        "tensors": {f"adv.{k}": describe_attack(s) for k, s in enumerate(attacks)},
        "batch_size": batch_size, "device": str(dev), "wall_time_s": time.perf_counter() - started})
    return path


class TransferSetDamaged(DamagedFileError):
    """A transfer set whose tensors or sidecar are unreadable or do not match."""


def load_transfer_set(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the sidecar of a transfer set, verified against the sidecar's checksum
    (sets written before checksums are read unverified); a damaged set is refused by name."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"{path} is not a complete transfer set (need it and {sidecar.name})")
    try:
        return _read_verified(path)
    except TransferSetDamaged as exc:
        raise TransferSetDamaged(f"{exc}; delete it and {sidecar.name}, and the same `phalanx eval --transfer-from` "
                                 "command crafts it again") from None


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sidecar = path.with_suffix(".json")
    try:
        meta = loads_checked(sidecar.read_text(encoding="utf-8"), sidecar)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransferSetDamaged(f"transfer set {path} is damaged: its sidecar {sidecar.name} is not JSON ({exc})") from None
    except DamagedFileError:
        raise TransferSetDamaged(f"transfer set {path} is damaged: its sidecar {sidecar.name} does not match "
                                 "its sha256") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TransferSetDamaged(f"transfer set {path} is damaged: {sidecar.name} is not a {FORMAT} sidecar "
                                 f"(format {found!r})")
    blob = path.read_bytes()
    if "tensors_sha256" in meta and (len(blob) != meta.get("tensors_bytes")
                                     or hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]):
        raise TransferSetDamaged(f"transfer set {path} is damaged: {len(blob)} bytes whose SHA-256 differs from "
                                 f"{sidecar.name}'s record ({meta.get('tensors_bytes')} bytes)")
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:
        raise TransferSetDamaged(f"transfer set {path} is damaged: not valid safetensors ({exc})") from None
    missing = sorted({"x", "y", "indices", *meta.get("tensors", {})} - set(tensors))
    if missing:
        raise TransferSetDamaged(f"transfer set {path} is damaged: it lacks the tensors {missing}")
    return tensors, meta


def surrogate_names(meta: Mapping[str, Any]) -> str:
    return "+".join(Path(r).name for r in meta["surrogate_runs"])


def evaluate_transfer(target_run_dir: str | Path, transfer_set_path: str | Path, *, device: str | None = None,
                      batch_size: int = 500, out_name: str | None = "transfer.json") -> dict[str, Any]:
    """Accuracy of each member and the mixture of the target run on a stored transfer set.

    Records (source "transfer:<surrogate run names>"): clean, then each stored attack, then one
    "strongest" record per (model, norm, eps): the per-example worst case over the stored attacks.
    Each record has its n and `ci95` (`stats.add_ci95`). Sanity checks run on the records, plus
    "white-box not above transfer" when the target has `eval/whitebox.json`. Writes
    `eval/<out_name>` in the target run directory (nothing when `out_name` is None) and returns it.
    """
    from phalanx.runs import read_run_config

    started = time.perf_counter()
    run_dir = Path(target_run_dir)
    tensors, meta = load_transfer_set(transfer_set_path)
    cfg = read_run_config(run_dir)
    if cfg.data.dataset != meta["dataset"]:
        raise UsageError(f"transfer set {transfer_set_path} is on {meta['dataset']!r}, target run {run_dir} "
                         f"on {cfg.data.dataset!r}")
    run = open_run(run_dir, device)
    cfg, dev = run.cfg, run.device
    x, y = tensors["x"].to(dev), tensors["y"].to(dev)
    if not torch.equal(run.test_split().images[tensors["indices"]].float().div(255), tensors["x"]):
        raise UsageError(f"transfer set {transfer_set_path} holds other images than the target's "
                         f"{cfg.data.dataset} test split at its indices")
    source = f"transfer:{surrogate_names(meta)}"
    adversarial = [(desc, tensors[key].to(dev)) for key, desc in meta["tensors"].items()]
    records = transfer_records(run.mixture(), x, y, adversarial, source=source, seed=meta["seed"],
                               batch_size=batch_size)
    extra = []
    whitebox_path = eval_dir(run_dir) / "whitebox.json"
    if whitebox_path.is_file():
        extra = check_whitebox_below_transfer(_whitebox_results(whitebox_path), records)
    sanity = apply_sanity_checks(records, extra=extra, white_box=False)
    doc = {"kind": "transfer", "run": str(run_dir), "dataset": cfg.data.dataset, "method": cfg.train.method,
           "arch": cfg.model.label, "epoch": run.epoch, "device": str(dev), "source": source,
           "transfer_set": str(transfer_set_path), "transfer_set_hash": meta["hash"],
           "surrogate_runs": meta["surrogate_runs"], "command": meta["command"],
           "wall_time_s": time.perf_counter() - started, "results": records, "sanity": sanity}
    if out_name is not None:
        write_eval_json(run_dir, out_name, doc)
    return doc


def transfer_records(mixture: Mixture, x: torch.Tensor, y: torch.Tensor,
                     adversarial: Sequence[tuple[Mapping[str, Any], torch.Tensor]], *, source: str, seed: int,
                     batch_size: int = 500) -> list[dict[str, Any]]:
    """Records of each member's and the mixture's accuracy on clean `x` and on each crafted set
    (`adversarial`: (description {attack, eps, params}, examples) pairs), then the per-example worst
    case per (model, norm, eps), each with its n and `ci95`."""
    n = len(y)
    records: list[dict[str, Any]] = []
    masks: dict[tuple[str, str, float], list[tuple[str, torch.Tensor]]] = {}
    clean: dict[str, torch.Tensor] = {}
    for name, model in named_models(mixture):
        t0 = time.perf_counter()
        clean[name] = correct_mask(model, x, y, batch_size)
        records.append({"model": name, "attack": "clean", "eps": 0.0, "accuracy": _mean(clean[name]), "n": n,
                        "params": {}, "source": source, "seed": seed, "wall_time_s": time.perf_counter() - t0})
        for desc, x_adv in adversarial:
            t0 = time.perf_counter()
            correct = correct_mask(model, x_adv, y, batch_size)
            norm = desc["params"].get("norm", "linf")
            masks.setdefault((name, norm, desc["eps"]), []).append((desc["attack"], correct))
            records.append({"model": name, "attack": desc["attack"], "eps": desc["eps"], "accuracy": _mean(correct),
                            "n": n, "params": desc["params"], "source": source, "seed": seed,
                            "wall_time_s": time.perf_counter() - t0,
                            "max_perturbation": max_perturbation(x_adv, x, norm)})
    records += strongest_records(masks, clean, source=source, seed=seed)
    add_ci95(records)
    return records


def _whitebox_results(path: Path) -> list[dict[str, Any]]:
    """The records of a run's `eval/whitebox.json` for a cross-check; none (with a warning) when it is damaged."""
    try:
        doc = read_json(path)
    except DamagedFileError as exc:
        warnings.warn(f"{exc}: the check 'white-box not above transfer' is skipped (run `phalanx eval` again "
                      "to rewrite it)", DamagedFileWarning, stacklevel=3)
        return []
    results = doc.get("results") if isinstance(doc, dict) else None
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _mean(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if len(mask) else 0.0
