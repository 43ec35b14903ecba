"""Faults on the training side: kills, damaged files, changed configs on resume, divergence
in the meta step, bad config ranges, unreadable pretraining images.

Each test states what a careful user expects; resumed runs are compared with an
uninterrupted run's ``metrics.jsonl`` (every row, exactly) and ``results.json`` (every
field but ``train_seconds``, a wall time).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from designers.train import main as vtrain_main
from designers.vision.config import VConfig
from designers.vision.hook import VisionDesignerHook
from dinov.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from dinov.config import ConfigError, load_config
from dinov.train.__main__ import main as train_main
from dinov.train.trainer import Trainer

SMOKE, VSMOKE = "configs/smoke.yaml", "configs/vsmoke.yaml"
QUIET = ["probe.enabled=false", "train.plots=false", "train.progress=none"]
# checkpoints at steps that are not log steps: losses are pending at every checkpoint
SHORT = ["train.steps=12", "train.log_every=4", "train.checkpoint_every=3", "train.keep_last=10",
         "data.num_samples=32", "data.batch_size=8"]
WALL_TIMES = ("train_seconds",)


def cfg_of(out: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={out}", *QUIET, *SHORT, *overrides])


def vcfg_of(out: Path, *overrides: str) -> VConfig:
    return load_config(VSMOKE, [f"output_dir={out}", *QUIET, *SHORT, "designer.every=2",
                                *overrides], schema=VConfig)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def results(out: Path) -> dict:
    found = json.loads((out / "results.json").read_text())
    return {k: v for k, v in found.items() if k not in WALL_TIMES}


class Killed(BaseException):
    """Stands for SIGKILL inside the test process: nothing is cleaned up or saved."""


def run_killed_at(trainer: Trainer, step: int) -> None:
    """Fit until ``step`` is about to run (steps before it ran, were logged and, where
    due, checkpointed), then die."""
    original = trainer.train_step

    def train_step(images):
        if trainer.step == step:
            raise Killed()
        return original(images)

    trainer.train_step = train_step  # type: ignore[method-assign]
    with pytest.raises(Killed):
        trainer.fit()


# --------------------------------------------------------------- kills and resume
def test_sigkill_at_several_steps_then_resume_reproduces_metrics_and_results(tmp_path: Path):
    """Real SIGKILLs of ``python -m dinov.train`` right after checkpoints 3 and 6 appear
    (the process may have gone on a step or two); each relaunch resumes."""
    straight = tmp_path / "straight"
    train_main([f"--config={SMOKE}", f"output_dir={straight}", *QUIET, *SHORT])
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "dinov.train", f"--config={SMOKE}", f"output_dir={killed}",
               *QUIET, *SHORT, "train.resume=true"]
    for step in (3, 6):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not checkpoint_path(killed / "checkpoints", step).exists():
            assert process.poll() is None and time.monotonic() < deadline, "run ended early"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert rows(killed) == rows(straight)
    assert results(killed) == results(straight)
    a = load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(killed / "checkpoints")[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vpretraining_killed_twice_reproduces_metrics_and_results(tmp_path: Path):
    straight = tmp_path / "straight"
    Trainer(cfg := vcfg_of(straight), hooks=[VisionDesignerHook(cfg)]).fit()
    killed = tmp_path / "killed"
    for step in (5, 8):  # after the checkpoints of steps 3 and 6, mid-log-interval
        cfg = vcfg_of(killed, "train.resume=true")
        run_killed_at(Trainer(cfg, hooks=[VisionDesignerHook(cfg)]), step)
    cfg = vcfg_of(killed, "train.resume=true")
    Trainer(cfg, hooks=[VisionDesignerHook(cfg)]).fit()
    assert rows(killed) == rows(straight)
    assert results(killed) == results(straight)


def test_train_seconds_add_up_over_processes_and_a_finished_run_keeps_its_results(tmp_path: Path):
    Trainer(cfg_of(tmp_path, "train.stop_at_step=6")).fit()
    first = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 6))["history"]["train_seconds"]
    assert first > 0
    Trainer(cfg_of(tmp_path, "train.resume=true")).fit()
    done = json.loads((tmp_path / "results.json").read_text())
    assert done["train_seconds"] > first
    before = (tmp_path / "results.json").read_bytes()
    again = Trainer(cfg_of(tmp_path, "train.resume=true")).fit()  # nothing left to do
    assert (tmp_path / "results.json").read_bytes() == before
    assert again["train_seconds"] == done["train_seconds"]


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog):
    straight = tmp_path / "straight"
    Trainer(cfg_of(straight)).fit()
    out = tmp_path / "run"
    run_killed_at(Trainer(cfg_of(out)), 7)
    newest = checkpoint_path(out / "checkpoints", 6)
    newest.write_bytes(newest.read_bytes()[:5000])  # a copy or a disk that gave up
    with caplog.at_level(logging.WARNING, logger="dinov.train"):
        Trainer(cfg_of(out, "train.resume=true")).fit()
    assert any(str(newest) in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)
    assert rows(out) == rows(straight) and results(out) == results(straight)


def test_torn_metrics_line_is_skipped_and_the_run_resumes(tmp_path: Path, caplog):
    straight = tmp_path / "straight"
    Trainer(cfg_of(straight)).fit()
    out = tmp_path / "run"
    run_killed_at(Trainer(cfg_of(out)), 9)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "lr": 0.00')  # killed in the middle of a write
    with caplog.at_level(logging.WARNING, logger="dinov.train"):
        Trainer(cfg_of(out, "train.resume=true")).fit()
    assert any("metrics.jsonl line" in r.getMessage() for r in caplog.records)
    assert rows(out) == rows(straight) and results(out) == results(straight)


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path: Path):
    stale = tmp_path / "checkpoints" / ".checkpoint_00000003.pt.12345.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    Trainer(cfg_of(tmp_path, "train.steps=3")).fit()
    assert not stale.exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint_00000003.pt"]


# ----------------------------------------------------------- config on resume
def _refused(capsys, run) -> str:
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_changed_architecture_on_resume_is_refused_in_one_line(tmp_path: Path, capsys):
    args = [f"--config={SMOKE}", f"output_dir={tmp_path}", *QUIET, *SHORT]
    train_main([*args, "train.stop_at_step=3"])
    config_before = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    line = _refused(capsys, lambda: train_main([*args, "train.resume=true", "model.embed_dim=32",
                                                "head.out_dim=128"]))
    assert "model.embed_dim: 64 -> 32" in line and "head.out_dim: 256 -> 128" in line
    assert (tmp_path / "config.yaml").read_bytes() == config_before


def test_other_changes_on_resume_are_warned_about_and_used(tmp_path: Path, caplog):
    Trainer(cfg_of(tmp_path, "train.stop_at_step=3")).fit()
    with caplog.at_level(logging.WARNING, logger="dinov.train"):
        out = Trainer(cfg_of(tmp_path, "train.resume=true", "train.steps=6")).fit()
    assert out["steps"] == 6
    assert any("train.steps: 12 -> 6" in r.getMessage() for r in caplog.records)
    assert "steps: 6" in (tmp_path / "config.yaml").read_text()


def test_checkpoint_of_the_other_trainer_is_refused(tmp_path: Path, capsys):
    train_main([f"--config={SMOKE}", f"output_dir={tmp_path}", *QUIET, *SHORT, "train.steps=3"])
    config_before = (tmp_path / "config.yaml").read_bytes()
    capsys.readouterr()
    line = _refused(capsys, lambda: vtrain_main([f"--config={VSMOKE}", f"output_dir={tmp_path}",
                                                 *QUIET, *SHORT, "train.resume=true"]))
    assert "written by python -m dinov.train, not by python -m designers.train" in line
    assert (tmp_path / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize("kind", ["none", "augment"])
def test_changed_designer_kind_on_resume_is_refused(tmp_path: Path, capsys, kind: str):
    args = [f"--config={VSMOKE}", f"output_dir={tmp_path}", *QUIET, *SHORT, "designer.every=2"]
    vtrain_main([*args, "train.stop_at_step=3"])
    capsys.readouterr()
    line = _refused(capsys, lambda: vtrain_main([*args, "train.resume=true", f"designer.kind={kind}"]))
    assert f"designer.kind: 'mask' -> '{kind}'" in line


# ----------------------------------------------------------- divergence
def _nan_once(monkeypatch, name: str, call: int) -> None:
    """Make the vision hook's ``name`` (a function it calls) return NaN in its ``call``-th
    call (0-based)."""
    import designers.vision.hook as hook_module

    original = getattr(hook_module, name)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] - 1 != call:
            return out
        if isinstance(out, tuple):  # (g_down list, L_down)
            return [g * float("nan") for g in out[0]], out[1]
        return out * float("nan")

    monkeypatch.setattr(hook_module, name, poisoned)


@pytest.mark.parametrize("name,part", [
    ("downstream_gradient_and_loss", "meta step: feedback gradient g_down (or L_down)"),
    ("designed_task_value", "meta step: value V (or the designer's regulariser)"),
])
def test_nan_in_the_meta_step_is_skipped_and_counted(tmp_path: Path, monkeypatch, name, part):
    _nan_once(monkeypatch, name, call=1)  # the second meta step (step 2)
    cfg = vcfg_of(tmp_path, "train.steps=6")
    hook = VisionDesignerHook(cfg)
    out = Trainer(cfg, hooks=[hook]).fit()
    assert out["nonfinite_steps"] == 1 and out["nonfinite_parts"] == {part: 1}
    assert out["designer_meta_steps"] == 2  # steps 0, 2, 4 scheduled; step 2 skipped
    predicted = hook.core.calibration.predicted
    assert len(predicted) == 2 and all(map(torch.isfinite, torch.tensor(predicted)))
    assert all(torch.isfinite(p).all() for p in hook.designer.parameters())
    assert rows(tmp_path)[-1]["nonfinite_steps"] == 1
    assert [r["step"] for r in rows(tmp_path) if "designer/V" in r] == [1, 5]


def test_too_many_nonfinite_meta_steps_stop_the_run_naming_the_part(tmp_path: Path, monkeypatch,
                                                                     capsys):
    import designers.vision.hook as hook_module

    monkeypatch.setattr(hook_module, "designed_task_value",
                        lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as info:
        vtrain_main([f"--config={VSMOKE}", f"output_dir={tmp_path}", *QUIET, *SHORT,
                     "designer.every=1", "train.max_nonfinite_steps=2"])
    assert info.value.code == 1
    assert "meta step: value V" in capsys.readouterr().err


# ----------------------------------------------------------- config ranges
@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"),
    ("train.log_every=0", "train.log_every"),
    ("loss.student_temp=0", "loss.student_temp"),
    ("loss.teacher_temp=0", "loss.teacher_temp"),
    ("loss.warmup_teacher_temp=0", "loss.warmup_teacher_temp"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("data.batch_size=0", "data.batch_size"),
    ("crops.global_crops_scale=[0.5,0.2]", "crops.global_crops_scale"),
    ("value.eps=0", "value.eps"),
    ("value.align_last_n_blocks=0", "value.align_last_n_blocks"),
    ("designer.lr=0", "designer.lr"),
    ("feedback.meta_batch_size=0", "feedback.meta_batch_size"),
])
def test_bad_ranges_are_errors_at_load_naming_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(VSMOKE, [override], schema=VConfig)


def test_aligned_blocks_beyond_the_depth_fail_before_the_first_step(tmp_path: Path):
    cfg = vcfg_of(tmp_path, "value.align_last_n_blocks=5", "designer.burn_in=8")  # depth 4
    with pytest.raises(ConfigError, match="value.align_last_n_blocks.*depth \\(4\\)"):
        Trainer(cfg, hooks=[VisionDesignerHook(cfg)])  # the hook's set-up: no step, no file
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------- unreadable images
def test_skipped_pretraining_images_reach_metrics_and_results(tmp_path: Path):
    """Two corrupt files among 16: every epoch passes over each once, counted in the main
    process even when a DataLoader worker reads them."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        if i in (3, 11):
            (folder / f"{i:02d}.png").write_bytes(b"not a png")
        else:
            Image.new("RGB", (48, 48), (i * 10, 80, 160)).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    cfg = cfg_of(out, "data.kind=folder", f"data.path={folder}", "data.num_samples=16",
                 "data.batch_size=8", "data.num_workers=1", "train.steps=4",
                 "train.log_every=2", "train.checkpoint_every=4")
    found = Trainer(cfg).fit()
    assert [r["skipped_images"] for r in rows(out)] == [2, 4]  # one epoch = 2 steps
    assert found["skipped_images"] == 4
