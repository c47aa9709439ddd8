"""The `phalanx` command: parses arguments, loads configs, calls the library. Nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from phalanx.checkpoint import CheckpointError
from phalanx.attacks import ATTACKS, AttackName, AttackSpec
from phalanx.config import ConfigError, SuiteConfig, load_config
from phalanx.data import DataError
from phalanx.errors import UsageError
from phalanx.files import DamagedFileError
from phalanx.memory import keep_freed_memory
from phalanx.presets import list_presets, resolve_config_path
from phalanx.runs import RunDirError
from phalanx.tensorboard import TensorboardUnavailable, require_tensorboard
from phalanx.train.distributed import RankFailed
from phalanx.train.loop import TrainingDiverged

# The project's own errors that a person fixes by asking differently (exit 2, one line). Anything
# else escaping a command, a bare ValueError included, is a bug: it keeps its traceback (exit 1).
USAGE_ERRORS = (ConfigError, DataError, RunDirError, CheckpointError, DamagedFileError,
                TensorboardUnavailable, UsageError)


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args: argparse.Namespace) -> int:
    from phalanx.train.loop import train

    cfg = load_config(resolve_config_path(args.config), args.set)
    out = Path(args.out) if args.out else _default_out(cfg.name)
    train(cfg, out, progress=not args.quiet, tensorboard=args.tensorboard)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from phalanx.eval.run_eval import evaluate_run
    from phalanx.eval.tables import CI_NOTE, accuracy_table, text_table

    from phalanx.runs import read_run_config

    protocol = args.protocol or read_run_config(args.run_dir).eval.protocol
    if protocol != "standard":
        return _eval_protocol(args, protocol)
    attacks = _attacks_from_args(args)
    if args.transfer_from:
        if args.suite:
            raise UsageError("--suite is white-box only; it cannot be combined with --transfer-from")
        return _eval_transfer(args, attacks)
    suites = None
    if args.suite:
        suites = [SuiteConfig(name, eps, norm=args.norm) for name in args.suite for eps in (args.eps or [DEFAULT_EPS])]
    doc = evaluate_run(args.run_dir, attacks=attacks, examples=args.examples, device=args.device,
                       progress=not args.quiet, large_eps=args.large_eps, suites=suites,
                       check_convergence=args.check_convergence)
    print(f"{doc['dataset_display']} — {doc['method']} {doc['arch']} (epoch {doc['epoch']}), white-box accuracy (%)")
    print(CI_NOTE)
    print(text_table(*accuracy_table(doc["results"])))
    _print_warnings(doc["results"])
    print(f"\nresults: {Path(args.run_dir) / 'eval' / 'whitebox.json'}")
    return 0


DEFAULT_EPS = 0.03  # --eps when not given: about 8/255, the CIFAR-10 budget of the seed papers


STEP_FLAGS = ("alpha", "steps", "restarts")  # --alpha, --steps, --restarts: attacks.STEP_PARAMETERS


def _attacks_from_args(args: argparse.Namespace) -> list[AttackSpec] | None:
    """The --attack x --eps grid; step flags that were given go to the attacks whose registry entry
    takes them, and an attack named alone runs with its registry defaults scaled to eps."""
    given = {flag: getattr(args, flag) for flag in STEP_FLAGS if getattr(args, flag) is not None}
    if not args.attack:
        for flag in given:
            raise UsageError(f"--{flag} needs --attack: it sets a parameter of the attacks named there")
        return None
    params = {name: {k: v for k, v in given.items() if k in ATTACKS[AttackName(name)].step_parameters()}
              for name in args.attack}
    for flag, value in given.items():
        if not any(flag in p for p in params.values()):
            allowed = sorted(a.value for a in AttackName if flag in ATTACKS[a].step_parameters())
            raise UsageError(f"--{flag} {value} is not taken by {', '.join(args.attack)}; attacks that take "
                             f"--{flag}: {allowed}")
    return [AttackSpec.from_mapping({"name": name, "eps": eps, **params[name]})
            for name in args.attack for eps in args.eps or [DEFAULT_EPS]]


def _print_warnings(records: list[dict]) -> None:
    notes = [f"  ! {r['model']} {r['attack']} {r['eps']:g}: {w}" for r in records for w in r.get("warnings", [])]
    if notes:
        print("\nSANITY WARNINGS (gradient masking or a broken evaluation?):", *notes, sep="\n")


def _eval_transfer(args: argparse.Namespace, attacks: list[AttackSpec] | None) -> int:
    import shlex

    from phalanx.eval.run_eval import resolve_examples
    from phalanx.eval.tables import CI_NOTE, paired_eps_table, text_table
    from phalanx.eval.transfer import GAL_TRANSFER_ATTACKS, craft_transfer_set, evaluate_transfer
    from phalanx.runs import read_run_config

    cfg = read_run_config(args.run_dir)
    attacks = attacks or list(GAL_TRANSFER_ATTACKS[cfg.data.dataset])
    path = craft_transfer_set(args.transfer_from, attacks,
                              examples=resolve_examples(args.examples, cfg.eval.examples),
                              seed=args.seed, out_path=Path(args.transfer_dir or Path(args.transfer_from[0]) / "transfer"),
                              batch_size=cfg.eval.batch_size, device=args.device,
                              command=shlex.join(["phalanx", *sys.argv[1:]]))
    doc = evaluate_transfer(args.run_dir, path, device=args.device, batch_size=cfg.eval.batch_size)
    print(f"transfer accuracy (%) of {args.run_dir}, examples crafted on {', '.join(args.transfer_from)}")
    print(CI_NOTE)
    print(text_table(*paired_eps_table(doc["results"])))
    _print_warnings(doc["results"])
    print(f"\nresults: {Path(args.run_dir) / 'eval' / 'transfer.json'}\ntransfer set: {path}")
    return 0


def _eval_protocol(args: argparse.Namespace, protocol: str) -> int:
    """`phalanx eval --protocol P`: a source's own evaluation, which fixes its attacks."""
    from phalanx.attacks.report_pgd import REPORT_EPS
    from phalanx.eval.protocols import LABELS, Protocol, evaluate_authors_protocol, evaluate_report_protocol
    from phalanx.eval.tables import CI_NOTE, accuracy_table, curve_table, text_table

    fixed = [f"--{flag.replace('_', '-')}" for flag in ("attack", "suite", *STEP_FLAGS, "large_eps")
             if getattr(args, flag)]
    if fixed:
        raise UsageError(f"--protocol {protocol} fixes its own attacks; drop {', '.join(fixed)} or use --protocol standard")
    if protocol == Protocol.GAL_PAPER:
        if not args.transfer_from:
            raise UsageError("--protocol gal-paper transfers from a surrogate: give --transfer-from SURROGATE_RUN")
        return _eval_transfer(args, None)
    if protocol == Protocol.DVERGE_REPORT:
        if args.transfer_from or args.eps:
            raise UsageError(f"--protocol dverge-report is white-box at the report's eps {REPORT_EPS:g}; "
                             "drop --transfer-from/--eps")
        doc = evaluate_report_protocol(args.run_dir, device=args.device, progress=not args.quiet)
        print(f"{doc['dataset_display']} — {doc['method']} {doc['arch']} (epoch {doc['epoch']}), accuracy (%) under "
              f"the {LABELS[Protocol.DVERGE_REPORT]} (its unprojected PGD; {doc['split']})")
        print(CI_NOTE)
        print(text_table(*accuracy_table(doc["results"])))
        _print_warnings(doc["results"])
        print(f"\nresults: {Path(args.run_dir) / 'eval' / 'dverge-report.json'}")
        return 0
    if not args.transfer_from or len(args.transfer_from) != 1:
        raise UsageError("--protocol dverge-authors transfers from one separately trained baseline ensemble: "
                         "give --transfer-from SURROGATE_RUN once")
    kwargs = {"eps_grid": tuple(args.eps)} if args.eps else {}
    doc = evaluate_authors_protocol(args.run_dir, args.transfer_from[0], examples=args.examples, device=args.device,
                                    transfer_dir=args.transfer_dir, seed=args.seed, progress=not args.quiet, **kwargs)
    print(f"{doc['dataset_display']} — {doc['method']} {doc['arch']} (epoch {doc['epoch']}), mixture accuracy (%) "
          f"under the {LABELS[Protocol.DVERGE_AUTHORS]}; surrogate {doc['surrogate_run']}")
    print(text_table(*curve_table(doc["curve"])))
    _print_warnings(doc["results"])
    print(f"\nresults: {Path(args.run_dir) / 'eval' / 'dverge-authors.json'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from phalanx.eval.analysis import GAAS_KS, analysis_path, analyze_run
    from phalanx.eval.tables import text_table
    from phalanx.runs import read_run_config

    for run_dir in args.run_dirs:  # refuse a bad directory before the first analysis runs
        read_run_config(run_dir)
    ks = () if args.no_gaas else tuple(args.gaas_k or GAAS_KS)
    for run_dir in args.run_dirs:
        doc = analyze_run(run_dir, examples=args.examples, gaas_ks=ks, gaas_eps=args.gaas_eps,
                          device=args.device, progress=not args.quiet)
        print(f"{doc['run']} ({doc['dataset']}, epoch {doc['epoch']}): gradient alignment of "
              f"{doc['members']} members on {doc['n']} test examples")
        summary = doc["coherence_summary"]
        if summary:
            print(text_table(["coherence (max pairwise cosine)", "value"], [
                ["mean", f"{summary['mean']:.3f}"], ["median", f"{summary['median']:.3f}"],
                ["examples > 0.5 (%)", f"{100 * summary['fraction_above_0.5']:.1f}"]]))
        if doc["gaas"]:
            eps_values = doc["gaas"]["eps_values"]
            p_all = {(r["k"], r["eps"]): r["p_all"] for r in doc["gaas"]["results"]}
            print(f"\nGAAS of the mixture: P(all k directions adversarial) (%), "
                  f"{doc['gaas']['n']} correctly classified examples")
            print(text_table(["k", *(f"eps {e:g}" for e in eps_values)],
                             [[str(k), *(f"{100 * p_all[(k, e)]:.1f}" for e in eps_values)]
                              for k in doc["gaas"]["ks"]]))
        for note in doc["notes"]:
            print(f"note: {note}")
        print()
    print("results:", *(analysis_path(d) for d in args.run_dirs), sep="\n")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from phalanx.quickstart import run_quickstart

    run_quickstart(Path(args.out), progress=not args.quiet, echo=print, tensorboard=args.tensorboard)
    return 0


def cmd_league(args: argparse.Namespace) -> int:
    import shlex

    from phalanx.eval.tables import CI_NOTE, text_table
    from phalanx.league import league_table, league_title, load_league_config, run_league

    cfg = load_league_config(resolve_config_path(args.config), args.set)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    doc = run_league(cfg, out, progress=not args.quiet, echo=print,
                     command=shlex.join(["phalanx", *sys.argv[1:]]))
    print(f"\n{league_title(doc)}")
    print(CI_NOTE)
    print(text_table(*league_table(doc)))
    notes = [f"  ! {method}: {w}" for method, entry in doc["defenses"].items() for w in entry["warnings"]]
    if notes:
        print("\nSANITY WARNINGS (gradient masking or a broken evaluation?):", *notes, sep="\n")
    print(f"\nresults: {out / 'league.json'}\nreport: {out / 'league.md'} (figure {out / 'league.png'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from phalanx.report import write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0])
    md, html = write_report([Path(d) for d in args.run_dirs], out, title=args.title)
    print(f"{md}\n{html}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from phalanx.reproduce import reproduce

    reproduce(args.name, Path(args.out), epochs_scale=args.epochs_scale, data_dir=args.data_dir,
              allow_noncanonical=args.allow_noncanonical, overrides=args.set, progress=not args.quiet,
              tensorboard=args.tensorboard)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    print("\n".join(list_presets()))
    return 0


def _examples_arg(text: str) -> int | str:
    """`eval --examples`: a positive integer, or `all` (run_eval.ALL_EXAMPLES) for the whole test split."""
    from phalanx.eval.run_eval import ALL_EXAMPLES

    if text == ALL_EXAMPLES:
        return ALL_EXAMPLES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a positive integer (a number of test "
                                         f"examples) or {ALL_EXAMPLES!r} (the whole test split)")
    return value


def _add_tensorboard_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also log training metrics for TensorBoard in each run directory's tensorboard/ "
                        "(needs the tensorboard package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phalanx", description="Train diverse ensembles and measure their robustness.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an ensemble from a YAML config or preset")
    p.add_argument("config", help="a YAML file or a preset name (see `phalanx presets`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP); an existing one resumes")
    _add_tensorboard_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="white-box evaluation of a run's members and mixture")
    p.add_argument("run_dir")
    p.add_argument("--attack", action="append", choices=[a.value for a in AttackName],
                   help="attack to run (repeatable; default: the run's eval.attacks, or the GAL paper's "
                        "transfer attacks with --transfer-from)")
    p.add_argument("--suite", action="append", choices=["autoattack", "ensemble"],
                   help="attack suite (repeatable): autoattack = AutoAttack's standard APGD-CE, APGD-T, FAB-T, "
                        "Square; ensemble = APGD on the mixture's mean logits (CE, DLR), its members' summed CE "
                        "and MORA's reweighting. The mixture's worst case covers every attack run")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="norm of --suite (default linf)")
    p.add_argument("--eps", action="append", type=float,
                   help=f"epsilon in pixel units [0, 1] (repeatable; default {DEFAULT_EPS})")
    p.add_argument("--alpha", type=float,
                   help="step size of the attacks that take one (default: each attack's own, e.g. PGD's 2.5 * eps / steps)")
    p.add_argument("--steps", type=int, help="iterations of the attacks that take them (default: each attack's own)")
    p.add_argument("--restarts", type=int, help="random restarts of the attacks that take them (default: each attack's own)")
    p.add_argument("--check-convergence", action="store_true",
                   help="run every iterative attack again with twice the steps and more restarts; warn when "
                        "accuracy drops by more than 1 point")
    p.add_argument("--examples", type=_examples_arg, metavar="N|all",
                   help="number of test examples, or `all` for the whole test split (default: the run's "
                        "eval.examples)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's)")
    p.add_argument("--large-eps", type=float,
                   help="also run PGD-Linf at this eps and warn unless accuracy is ~0 (e.g. 0.5)")
    p.add_argument("--transfer-from", action="append", metavar="SURROGATE_RUN",
                   help="black-box: craft examples on these runs' members (repeatable: members combined, "
                        "their average CE attacked) and evaluate RUN_DIR on them")
    p.add_argument("--transfer-dir", help="where transfer sets are stored and reused "
                                          "(default: FIRST_SURROGATE/transfer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the transfer set's random starts")
    p.add_argument("--protocol", choices=["standard", "dverge-report", "dverge-authors", "gal-paper"],
                   help="whose evaluation: standard (phalanx's; the default unless the run's eval.protocol says "
                        "otherwise), dverge-report (the report's script, unprojected PGD, labelled 'report "
                        "protocol'), dverge-authors (PGD-50 white-box and transfer from --transfer-from over eps "
                        "0.01-0.07), gal-paper (the GAL transfer table from --transfer-from)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the GAL paper's gradient analyses: coherence histograms and GAAS")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--examples", type=int, default=1000,
                   help="the first N test examples (default 1000, or all when fewer)")
    p.add_argument("--gaas-k", action="append", type=int, metavar="K",
                   help="GAAS number of directions (repeatable; default 4, 16, 36, 64: 4^m or 36 * 4^m)")
    p.add_argument("--gaas-eps", action="append", type=float, metavar="E",
                   help="GAAS eps in pixel units [0, 1] (repeatable; default 0.03/0.06/0.09 on cifar10, "
                        "else 0.1/0.2/0.3)")
    p.add_argument("--no-gaas", action="store_true", help="coherence only, no GAAS")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("quickstart", help="the main job: train and compare ensembles on the embedded dataset")
    p.add_argument("--out", default="runs/quickstart", help="directory for the runs and the report")
    _add_tensorboard_flag(p)
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("league", help="train every ensemble defense on one budget and compare them under one "
                                      "protocol (league.json, league.md, league.png)")
    p.add_argument("config", help="a league YAML file or preset, e.g. league/digits (see `phalanx presets`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a league value, e.g. --set epochs=5 --set 'methods=[baseline,gal]' "
                        "--set overrides.gal.method.gal_lambda=1.0 (repeatable)")
    p.add_argument("--out", help="folder for the runs and the report (default: runs/NAME); the runs in an "
                                 "existing one with the same configuration are reused")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.set_defaults(func=cmd_league)

    p = sub.add_parser("report", help="write report.md and report.html for one run or a comparison of several")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="directory for the report (default: the first run directory)")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="run the chain a seed table needs and print ours beside the paper's")
    p.add_argument("name", help="a preset with paper numbers, e.g. dverge-report/table1-vanilla")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every run's epochs (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every run of the chain, e.g. --set data.train_subset=5000")
    p.add_argument("--data-dir", help="dataset root (default: $PHALANX_DATA or ~/.cache/phalanx/data)")
    p.add_argument("--allow-noncanonical", action="store_true",
                   help="load dataset copies whose checksum differs from the canonical files (with a warning)")
    p.add_argument("--out", default="runs/reproduce", help="root directory for the chain's runs")
    _add_tensorboard_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("presets", help="list the shipped config presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as the user reads it (damaged checkpoint skipped, run in use, ...): one line."""
    return f"phalanx: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = _one_line_warning
    try:
        if getattr(args, "tensorboard", False):
            require_tensorboard()  # before any training, for every command that takes the flag
        return args.func(args)
    except USAGE_ERRORS as exc:
        print(f"phalanx: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RankFailed, OSError) as exc:  # not usage errors: a failed run, a full disk
        print(f"phalanx: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phalanx: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
