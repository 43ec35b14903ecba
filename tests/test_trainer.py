"""The learner's loop: losses decrease, exact resume, non-finite steps, the extension point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dinov.checkpoint import latest_checkpoint, load_checkpoint
from dinov.config import load_config
from dinov.runs import NonFiniteLossError
from dinov.train.task import StepHook
from dinov.train.trainer import Trainer

SMOKE = "configs/smoke.yaml"


def smoke_cfg(tmp_path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", "probe.enabled=false", "train.plots=false",
                               "train.progress=none", *overrides])


def losses_of(output_dir) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_decreases_and_run_files(tmp_path):
    cfg = smoke_cfg(tmp_path, "train.steps=30", "train.log_every=5", "train.plots=true")
    results = Trainer(cfg).fit()
    losses = losses_of(tmp_path)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5, losses
    for name in ("config.yaml", "metrics.jsonl", "results.json", "loss.png"):
        assert (tmp_path / name).exists(), name
    assert results["steps"] == 30
    assert load_config(tmp_path / "config.yaml") == cfg  # the saved config resolves to the same run


def test_resume_is_bitwise_identical(tmp_path):
    common = ["train.steps=8", "train.log_every=1", "train.checkpoint_every=4", "data.num_samples=64"]
    straight = tmp_path / "straight"
    Trainer(smoke_cfg(straight, *common)).fit()
    resumed = tmp_path / "resumed"
    out = Trainer(smoke_cfg(resumed, *common, "train.stop_at_step=5")).fit()
    assert out == {"stopped_at_step": 5}
    # step 5 checkpoint exists; a later crash leaves extra log lines, which resume drops
    Trainer(smoke_cfg(resumed, *common, "train.resume=true")).fit()
    assert losses_of(straight) == losses_of(resumed)
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        for pid, state in a["optimizer"]["state"].items():
            assert torch.equal(state[key], b["optimizer"]["state"][pid][key])


class _PoisonFirstSteps(StepHook):
    """Makes the first ``n`` tasks produce NaN losses."""

    name = "poison"

    def __init__(self, n: int) -> None:
        self.n = n

    def before_step(self, ctx, images, task):
        if ctx.step < self.n:
            task.student_global = task.student_global * float("nan")
        return task


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    cfg = smoke_cfg(tmp_path / "a", "train.steps=6", "train.max_nonfinite_steps=3")
    trainer = Trainer(cfg, hooks=[_PoisonFirstSteps(2)])
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.train_step(next(trainer.stream.iterate(0)))
    after = trainer.model.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped: weights untouched
    trainer.step = 1
    results = trainer.fit()
    assert results["nonfinite_steps"] == 2
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=3"):
        Trainer(smoke_cfg(tmp_path / "b", "train.steps=6", "train.max_nonfinite_steps=3"),
                hooks=[_PoisonFirstSteps(6)]).fit()


class _CountingHook(StepHook):
    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def after_step(self, ctx, task, losses):
        self.calls += 1
        return {"calls": float(self.calls)}

    def summary(self):
        return {"hook_calls": float(self.calls)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_hooks_are_called_and_checkpointed(tmp_path):
    hook = _CountingHook()
    results = Trainer(smoke_cfg(tmp_path, "train.steps=3"), hooks=[hook]).fit()
    assert hook.calls == 3 and results["hook_calls"] == 3.0
    state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert state["hooks"] == {"counting": {"calls": 3}}
    # what after_step returns is every step's row, under the hook's name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["counting/calls"] for r in rows] == [1.0, 2.0, 3.0]


def test_teacher_is_ema_of_student(tmp_path):
    trainer = Trainer(smoke_cfg(tmp_path, "train.steps=2"))
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    trainer.train_step(next(trainer.stream.iterate(0)))
    m = trainer.schedules.at(0)["momentum"]
    student = trainer.model.student.state_dict()
    for key, value in trainer.model.teacher.state_dict().items():
        expected = m * teacher_before[key] + (1 - m) * student[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


def test_bf16_autocast_runs(tmp_path):
    results = Trainer(smoke_cfg(tmp_path, "train.steps=3", "train.precision=bf16")).fit()
    assert results["nonfinite_steps"] == 0 and results["final_loss"] is not None


def test_cli_smoke_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dinov.train", "--config", SMOKE,
                           f"output_dir={tmp_path}", "train.progress=none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 20 and results["probe_top1_final"] is not None


def test_tensorboard_logs_the_metrics_rows_and_a_resume_purges_the_lost_ones(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train.steps=6", "train.log_every=2", "train.checkpoint_every=2", "log.tensorboard=true"]
    Trainer(smoke_cfg(tmp_path, *args, "train.stop_at_step=4"), hooks=[_CountingHook()]).fit()
    Trainer(smoke_cfg(tmp_path, *args, "train.resume=true"), hooks=[_CountingHook()]).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "counting/calls"):
        logged = {(e.step, round(e.value, 5)) for e in events.Scalars(tag)}
        expected = {(r["step"], round(r[tag], 5)) for r in rows if tag in r}
        assert logged == expected, tag
