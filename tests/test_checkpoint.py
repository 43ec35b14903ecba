"""Atomic checkpoints: keep-last-k, temp files ignored, SIGKILL mid-write is harmless."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from dinov.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    (tmp_path / ".checkpoint_00000005.pt.123.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint_00000004.pt"


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "checkpoint_00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    try:
        load_checkpoint(bad)
    except RuntimeError as error:
        assert str(bad) in str(error)
    else:
        raise AssertionError("expected a RuntimeError")


_WRITER = textwrap.dedent("""
    import sys, torch
    from dinov.checkpoint import save_checkpoint
    directory = sys.argv[1]
    save_checkpoint(directory, 1, {"step": 1, "w": torch.arange(10.0)}, keep_last=3)
    print("first", flush=True)
    big = {"step": 2, "w": torch.zeros(64 * 1024 * 1024)}  # 256 MB: slow enough to be killed mid-write
    while True:
        save_checkpoint(directory, 2, big, keep_last=3)
""")


def test_sigkill_during_write_leaves_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.time() + 60
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            assert time.time() < deadline, "writer never started the second checkpoint"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # killed mid-write
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "checkpoint_00000001.pt"
    state = load_checkpoint(latest)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(10.0))


def test_load_tensor_file_maps_privately_and_reads_legacy_files(tmp_path):
    from dinov.checkpoint import load_tensor_file

    path = tmp_path / "zip.pt"
    torch.save({"w": torch.zeros(4)}, path)
    mapped = load_tensor_file(path)
    mapped["w"] += 1  # copy-on-write: the file must not change
    assert torch.equal(load_tensor_file(path)["w"], torch.zeros(4))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_tensor_file(legacy)["w"], torch.arange(3.0))
