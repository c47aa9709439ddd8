"""Writes killed at random points (docs/reliability.md): the next command recovers or refuses by name.

A session (train, white-box eval, transfer eval) runs in a forked child that dies at its k-th
low-level write event, with k drawn from a seeded generator. An event is an `os.fsync` (the child
may first tear the file's last line, as a lost power would) or an `os.replace` (the child dies
before or after the rename). It dies by `os._exit`, as a SIGKILL would: no `finally`, no cleanup.
Meanwhile "the user" drops notes into the run's folders. The parent then runs the interrupted
command and the rest in-process: each exits 0, or 1/2 with one `phalanx: error:` line naming a
file, never a traceback; no note is lost; and when all succeed the results equal an uncut session's.
"""

import os
import random
import stat
from pathlib import Path

import pytest

from phalanx.cli import main
from phalanx.files import read_json
from phalanx.runs import read_metrics

TINY = ["--set", "data.train_subset=128", "--set", "model.members=2", "--set", "train.epochs=2",
        "--set", "train.batch_size=64", "--set", "device=cpu", "--quiet"]
NOTE_DIRS = ("run", "run/checkpoints", "run/eval", "sets")  # where "the user" keeps a notes.txt


def _session(root):
    run, sets = str(root / "run"), str(root / "sets")
    return [["train", "quickstart/baseline", "--out", run, *TINY],
            ["eval", run, "--quiet", "--attack", "fgsm", "--examples", "16"],
            ["eval", run, "--quiet", "--transfer-from", run, "--attack", "fgsm", "--examples", "16",
             "--transfer-dir", sets]]


def _results(root):
    """What the session produced, without timings: per-epoch losses and every accuracy."""
    run = root / "run"
    return ([(m["epoch"], m["train_loss"], m["val_mixture_acc"]) for m in read_metrics(run)],
            [[(r["model"], r["attack"], r["accuracy"]) for r in read_json(run / "eval" / name)["results"]]
             for name in ("whitebox.json", "transfer.json")])


def _place_notes(root):
    """Notes of the user's, in each folder that exists once the run is a run (config.yaml written)."""
    if not (root / "run" / "config.yaml").is_file():
        return
    for folder in NOTE_DIRS:
        note = root / folder / "notes.txt"
        if (root / folder).is_dir() and not note.exists():
            note.write_text(f"the user's notes in {folder}\n")


def _tear(fd, rng):
    """Cut a regular file inside its last line, as if only part of the last write reached the disk."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size < 2:
        return
    data = Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes()  # fd may be write-only
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    os.ftruncate(fd, rng.randint(start, len(data) - 1))


def _run_killed(root, kill_at, rng):
    """Fork; the child runs the session and dies at write event `kill_at`. Returns the index of the
    command it died in (len(session) when it was not killed)."""
    root.mkdir()
    progress = root / "progress"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real_fsync, real_replace, count = os.fsync, os.replace, [0]

            def event():
                count[0] += 1
                _place_notes(root)
                return count[0] == kill_at

            def fsync(fd):
                if event():
                    try:
                        if rng.random() < 0.5:
                            _tear(fd, rng)
                    finally:
                        os._exit(137)
                real_fsync(fd)

            def replace(src, dst, **kw):
                if event():
                    try:
                        if rng.random() < 0.5:
                            real_replace(src, dst, **kw)
                    finally:
                        os._exit(137)
                real_replace(src, dst, **kw)

            os.fsync, os.replace = fsync, replace
            for i, argv in enumerate(_session(root)):
                progress.write_text(str(i))
                main(argv)
            progress.write_text(str(len(_session(root))))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 137)
    return int(progress.read_text())


def _count_events(root, monkeypatch):
    """Run the session uncut, counting write events; returns the count."""
    count = [0]
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        count[0] += 1
        real_fsync(fd)

    def replace(src, dst, **kw):
        count[0] += 1
        real_replace(src, dst, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(os, "replace", replace)
        for argv in _session(root):
            assert main(argv) == 0
    return count[0]


def _trial(root, kill_at, seed, expected, capsys):
    """One killed session and its continuation; returns how it ended (for the failure message)."""
    rng = random.Random(seed)
    died_in = _run_killed(root, kill_at, rng)
    _place_notes(root)
    notes = {p: p.read_bytes() for p in root.rglob("notes.txt")}
    capsys.readouterr()
    outcome = "recovered"
    for argv in _session(root)[died_in:]:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert not any("Traceback" in line for line in err), err
        if code != 0:
            errors = [line for line in err if line.startswith("phalanx: error:")]
            assert code in (1, 2) and len(errors) == 1 and err[-1] == errors[0], (code, err)
            assert str(root) in errors[0], errors[0]  # names the file or folder
            outcome = f"refused: {errors[0]}"
            break
    assert {p: p.read_bytes() for p in notes} == notes, "a note of the user's was lost or changed"
    if outcome == "recovered":
        assert _results(root) == expected
    return f"event {kill_at} in command {died_in}: {outcome}"


def _kill_at_random_points(tmp_path, monkeypatch, capsys, *, trials, seed):
    """`trials` sessions (at most one per write event), each killed at a distinct event drawn with `seed`."""
    uncut = tmp_path / "uncut"
    events = _count_events(uncut, monkeypatch)
    expected = _results(uncut)
    rng = random.Random(seed)
    outcomes = [_trial(tmp_path / f"kill{k}", k, seed * 1000 + k, expected, capsys)
                for k in sorted(rng.sample(range(1, events + 1), min(trials, events)))]
    with capsys.disabled():
        print(f"\n{events} write events;", *outcomes, sep="\n  ")


def test_a_write_killed_at_random_points_is_recovered_or_refused_by_name(tmp_path, monkeypatch, capsys):
    _kill_at_random_points(tmp_path, monkeypatch, capsys, trials=8, seed=13)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_write_killed_at_every_point_is_recovered_or_refused_by_name(tmp_path, monkeypatch, capsys, seed):
    """Every write event of the session, each with the seed's choice of tearing and rename side."""
    _kill_at_random_points(tmp_path, monkeypatch, capsys, trials=10_000, seed=seed)
