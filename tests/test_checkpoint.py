import json

import pytest
import torch

from phalanx.checkpoint import (
    CheckpointError, latest_checkpoint, pack_members, pack_optimizer, read_checkpoint, save_checkpoint,
    unpack_members, unpack_optimizer,
)
from phalanx.files import seal, write_bytes_atomic
from phalanx.models import InputSpec, build_model

SPEC = InputSpec(1, 16, 10, (0.5,), (0.5,))


def _trained_pair():
    members = [build_model("conv", SPEC) for _ in range(2)]
    opt = torch.optim.Adam([{"params": list(m.parameters())} for m in members], lr=1e-3)
    loss = sum(m(torch.rand(4, 1, 16, 16)).sum() for m in members)
    loss.backward()
    opt.step()
    return members, opt


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    members, opt = _trained_pair()
    tensors, plain = pack_optimizer(opt)
    save_checkpoint(tmp_path, 3, {**pack_members(members), **tensors}, {"optimizer": plain, "arch": "conv"})
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.meta["epoch"] == 3 and ckpt.meta["arch"] == "conv"
    fresh = [build_model("conv", SPEC) for _ in range(2)]
    fresh_opt = torch.optim.Adam([{"params": list(m.parameters())} for m in fresh], lr=1e-3)
    unpack_members(ckpt.tensors, fresh)
    unpack_optimizer(fresh_opt, ckpt.tensors, ckpt.meta["optimizer"])
    for a, b in zip(members, fresh):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_only_the_newest_are_kept_and_damaged_ones_are_skipped(tmp_path):
    members, _ = _trained_pair()
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, pack_members(members), {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["epoch_0002.json", "epoch_0003.json"]
    blob = tmp_path / "epoch_0003.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10])  # a torn write
    with pytest.raises(CheckpointError, match="do not match"):
        read_checkpoint(tmp_path / "epoch_0003.json")
    assert latest_checkpoint(tmp_path).meta["epoch"] == 2


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    members, _ = _trained_pair()
    save_checkpoint(tmp_path, 1, pack_members(members), {})
    other = [build_model("conv3", SPEC) for _ in range(2)]
    with pytest.raises(CheckpointError, match="member 0 does not match"):
        unpack_members(latest_checkpoint(tmp_path).tensors, other)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    write_bytes_atomic(target, b"old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_checkpoint_files_are_json_and_safetensors_only(tmp_path):
    members, _ = _trained_pair()
    path = save_checkpoint(tmp_path, 1, pack_members(members), {"note": "x"})
    meta = json.loads(path.read_text())
    assert len(meta["tensors_sha256"]) == 64
    assert path.with_suffix(".safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


@pytest.mark.parametrize("edit, message", [
    ({"epoch": "three"}, "field 'epoch' = 'three'"),
    ({"epoch": -1}, "field 'epoch' = -1"),
    ({"epoch": 7}, "its name says epoch 1"),
    ({"members": [2]}, "field 'members'"),
    ({"tensors_sha256": None}, "field 'tensors_sha256'"),
], ids=["string-epoch", "negative-epoch", "epoch-not-its-name", "mistyped-members", "null-checksum"])
def test_a_record_with_a_missing_or_mistyped_field_is_damaged(tmp_path, edit, message):
    members, _ = _trained_pair()
    path = save_checkpoint(tmp_path, 1, pack_members(members), {"members": 2})
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, **edit}))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    del record["batch"]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="lacks the field 'batch'"):
        read_checkpoint(path)


def test_malformed_safetensors_with_a_matching_record_is_refused_by_name(tmp_path):
    import hashlib
    members, _ = _trained_pair()
    path = save_checkpoint(tmp_path, 1, pack_members(members), {})
    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    path.with_suffix(".safetensors").write_bytes(blob)
    record = {k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}
    path.write_text(json.dumps(seal({**record, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                                     "tensors_bytes": len(blob)})))  # a record that matches the bad tensors
    with pytest.raises(CheckpointError, match="epoch_0001.json.*not valid safetensors"):
        read_checkpoint(path)


def test_a_damaged_newest_is_skipped_with_a_warning_and_all_damaged_is_refused(tmp_path):
    from phalanx.checkpoint import CheckpointWarning
    members, _ = _trained_pair()
    for epoch in (1, 2):
        save_checkpoint(tmp_path, epoch, pack_members(members), {})
    (tmp_path / "epoch_0002.safetensors").write_bytes(b"torn")
    with pytest.warns(CheckpointWarning, match=r"epoch_0002\.json.*skipped; epoch_0001\.json \(epoch 1\) is used"):
        assert latest_checkpoint(tmp_path).meta["epoch"] == 1
    (tmp_path / "epoch_0001.json").write_text("{")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged .*refusing to start again from zero"):
        latest_checkpoint(tmp_path)


def test_a_failed_commit_leaves_no_uncommitted_tensor_file(tmp_path, monkeypatch):
    import phalanx.checkpoint as checkpoint
    members, _ = _trained_pair()
    save_checkpoint(tmp_path, 1, pack_members(members), {})

    def full_disk(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_json_atomic", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, pack_members(members), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.json", "epoch_0001.safetensors"]


def test_only_abandoned_temporary_files_of_phalanx_are_removed(tmp_path):
    import fcntl
    import os
    from phalanx.files import remove_temp_files
    old = 1_000_000_000
    abandoned = tmp_path / ".epoch_0002.json.ab12cd34.tmp"
    live = tmp_path / ".epoch_0003.json.zz99yy88.tmp"
    fresh = tmp_path / ".epoch_0004.json.qq11ww22.tmp"
    users = [tmp_path / "mine.tmp", tmp_path / ".mine.tmp", tmp_path / ".notes.backup.tmp"]
    for path in (abandoned, live, fresh, *users):
        path.write_text("x")
    for path in (abandoned, live, *users):
        os.utime(path, (old, old))
    with open(live) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert remove_temp_files(tmp_path) == [abandoned]
    assert live.exists() and fresh.exists() and all(p.exists() for p in users)
    assert sorted(remove_temp_files(tmp_path, grace_s=0)) == sorted([live, fresh])
