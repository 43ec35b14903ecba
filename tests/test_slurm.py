"""Cluster launch and preemption: 2-task submitit jobs (LocalExecutor, gloo) where one
rank gets a real SIGUSR2 mid-run end bitwise equal to an uninterrupted job, for the three
entry points; the submit-time checks and the dry run; the job callable's environment; the
time-based save and the single-process signal path."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import time
from typing import Any

import pytest
import torch

import dinov  # noqa: F401  (torchvision shim first)
from dinov.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from dinov.config import load_config
from dinov.train.trainer import Trainer
from slurm import submit
from slurm.job import TrainingJob, export_distributed_env, master_port, resume_argv

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent
JOB_TIMEOUT_S = 300
VISION = ["probe.enabled=false", "train.plots=false", "train.progress=log", "train.steps=6",
          "train.log_every=1", "train.checkpoint_every=100", "data.num_samples=64",
          "data.batch_size=8", "dist.strategy=ddp"]


def _rows(run: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _results(run: pathlib.Path) -> dict[str, Any]:
    timing = ("train_seconds", "tokens_per_second", "final")
    return {k: v for k, v in json.loads((run / "results.json").read_text()).items() if k not in timing}


def _assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    """Nested checkpoint states equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_bitwise(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _preempted_and_uninterrupted(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, entry: str,
                                 config: str, overrides: list[str], at_step: int) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Submit both 2-task jobs at once; rank 1 of the first gets SIGUSR2 before ``at_step``."""
    import submitit

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT)]))
    monkeypatch.setenv("PREEMPT_ENTRY", entry)
    monkeypatch.setenv("PREEMPT_AT_STEP", str(at_step))
    monkeypatch.setenv("PREEMPT_RANK", "1")
    monkeypatch.setenv("PREEMPT_MARKER", str(tmp_path / "signalled"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(tasks_per_node=2, timeout_min=60)
    preempted, uninterrupted = tmp_path / "preempted", tmp_path / "uninterrupted"
    jobs = [executor.submit(TrainingJob("preempt_entry", config, [*overrides, f"output_dir={preempted}"])),
            executor.submit(TrainingJob(entry, config, [*overrides, f"output_dir={uninterrupted}"]))]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            for job in jobs:
                job.cancel(check=False)
            pytest.fail(f"the jobs did not end in {JOB_TIMEOUT_S} s (logs in {tmp_path / 'jobs'})")
        time.sleep(0.5)
    for job in jobs:
        job.results()  # raises with the task's traceback when one failed
    assert (tmp_path / "signalled").read_text() == f"SIGUSR2 at step {at_step} on rank 1\n"
    return preempted, uninterrupted, tmp_path / "jobs" / f"{jobs[0].job_id}_%d_log.out"


def _assert_stopped_together(log_pattern: pathlib.Path, step: int) -> None:
    logs = [pathlib.Path(str(log_pattern).replace("%d", str(rank))).read_text() for rank in (0, 1)]
    assert f"saved step {step} and stopping: a signal on another rank" in logs[0]
    assert f"saved step {step} and stopping: SIGUSR2 on this rank" in logs[1]
    assert "Requeued job" in logs[0]  # submitit's handler, called by rank 0 after the save
    for log in logs:  # the requeued job (a fresh copy of the callable) resumed
        assert re.search(rf"resumed from \S+/checkpoint_{step:08d}(\.pt)? at step {step}\n", log)


def _assert_same_runs(preempted: pathlib.Path, uninterrupted: pathlib.Path) -> None:
    assert _rows(preempted) == _rows(uninterrupted)
    assert _results(preempted) == _results(uninterrupted)
    a, b = _final_state(preempted), _final_state(uninterrupted)
    assert a["step"] == b["step"]
    keys = ("model", "optimizer", "hooks") if "hooks" in a else ("model", "optimizer", "stream")
    for key in keys:
        _assert_bitwise(a[key], b[key], key)


def _final_state(run: pathlib.Path) -> dict[str, Any]:
    """The newest checkpoint as one state (a sharded one exported first)."""
    newest = latest_checkpoint(run / "checkpoints")
    if newest.is_dir():
        from dinov.sharded import export_single_file, read_common

        export_single_file(newest, run / "newest.pt")
        state = load_checkpoint(run / "newest.pt")
        return {**state, "optimizer": {}, "hooks": read_common(newest)["hooks"]}
    return load_checkpoint(newest)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_signal_on_one_rank_saves_both_and_the_requeued_job_ends_bitwise(tmp_path, monkeypatch,
                                                                         strategy: str) -> None:
    """DDP with the single file; FSDP with its default, sharded checkpoints."""
    overrides = [*VISION[:-1], f"dist.strategy={strategy}"]
    preempted, uninterrupted, logs = _preempted_and_uninterrupted(
        tmp_path, monkeypatch, "dinov.train", "configs/smoke.yaml", overrides, at_step=3)
    # the signal came before step 3's all-reduce: both ranks saved after that step (4),
    # not at checkpoint_every (100)
    suffix = ".pt" if strategy == "ddp" else ""
    assert [p.name for p in list_checkpoints(preempted / "checkpoints")] == [
        f"checkpoint_00000004{suffix}", f"checkpoint_00000006{suffix}"]
    _assert_stopped_together(logs, 4)
    _assert_same_runs(preempted, uninterrupted)


@pytest.mark.slow
def test_preempted_v_pretraining_restores_designer_heads_and_calibration(tmp_path, monkeypatch) -> None:
    overrides = [*VISION, "designer.kind=mask", "feedback.synthetic_head_pool=16",
                 "feedback.synthetic_meta_pool=8", "feedback.head_steps=2"]
    preempted, uninterrupted, logs = _preempted_and_uninterrupted(
        tmp_path, monkeypatch, "designers.train", "configs/vsmoke.yaml", overrides, at_step=2)
    _assert_stopped_together(logs, 3)
    _assert_same_runs(preempted, uninterrupted)  # hooks: designer, Adam, heads, calibration
    rows = _rows(preempted)
    assert any("designer/V" in row for row in rows if row["step"] > 3)
    assert any("designer/realised_delta" in row for row in rows if row["step"] > 3)


@pytest.mark.slow
def test_preempted_lm_job_ends_bitwise(tmp_path, monkeypatch) -> None:
    from designers.lm.synthetic import write_default

    tiny = write_default(tmp_path / "tiny", n_corpus=300, n_train=20, n_test=10)
    overrides = [f"model.path={tiny['model']}", f"data.path={tiny['corpus']}", "synthetic.dir=null",
                 "train.progress=log", "train.steps=6", "train.log_every=1",
                 "train.checkpoint_every=100", "train.micro_batch_size=2", "train.grad_accum=1"]
    preempted, uninterrupted, logs = _preempted_and_uninterrupted(
        tmp_path, monkeypatch, "designers.lm.train", "configs/lm/smoke.yaml", overrides, at_step=2)
    _assert_stopped_together(logs, 3)
    _assert_same_runs(preempted, uninterrupted)


# ----- one process ---------------------------------------------------------------------
def _vision_cfg(out: pathlib.Path, *overrides: str) -> Any:
    return load_config("configs/smoke.yaml", [f"output_dir={out}", *VISION[:-1], "train.progress=none",
                                              *overrides])


def test_a_signal_in_one_process_saves_that_step_and_restores_the_handlers(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    original = Trainer.train_step

    def train_step(self: Trainer, images: torch.Tensor) -> Any:
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM: also a preemption signal
        return original(self, images)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        before = signal.getsignal(signal.SIGTERM)
        results = Trainer(_vision_cfg(tmp_path / "run")).fit()
        assert results == {"stopped_at_step": 3, "preempted_at_step": 3, "signal": "SIGTERM"}
        assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_00000003.pt"]
        assert signal.getsignal(signal.SIGTERM) is before  # handed back after the run
        assert calls == []  # SIGTERM's previous handler is not SIGUSR2's
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(_vision_cfg(tmp_path / "run", "train.resume=true")).fit()
    reference = Trainer(_vision_cfg(tmp_path / "ref")).fit()
    assert resumed["final_loss"] == reference["final_loss"]


def test_the_previous_handler_of_the_signal_runs_after_the_save_on_rank_0(tmp_path) -> None:
    """What submitit's handler gets: called once, after the checkpoint is on disk."""
    seen: list[tuple[int, bool]] = []
    checkpoints = tmp_path / "run" / "checkpoints"
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(
        (signum, latest_checkpoint(checkpoints) is not None)))
    original = Trainer.train_step
    try:
        def train_step(self: Trainer, images: torch.Tensor) -> Any:
            if self.step == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            return original(self, images)

        Trainer.train_step = train_step  # type: ignore[method-assign]
        results = Trainer(_vision_cfg(tmp_path / "run")).fit()
    finally:
        Trainer.train_step = original  # type: ignore[method-assign]
        signal.signal(signal.SIGUSR2, previous)
    assert results["preempted_at_step"] == 2
    assert seen == [(int(signal.SIGUSR2), True)]


def test_a_signal_after_the_last_agreement_is_handed_on_after_the_run(tmp_path) -> None:
    """Nothing is left to save, but the time limit still comes: the previous handler
    (submitit's requeue) gets the signal once the run is done."""
    seen: list[bool] = []
    results_file = tmp_path / "run" / "results.json"
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(results_file.is_file()))
    original = Trainer._after_step

    def after_step(self: Trainer, bar: Any) -> None:
        original(self, bar)
        if self.step == self.cfg.train.steps:  # past the last step's all-reduce
            os.kill(os.getpid(), signal.SIGUSR2)

    try:
        Trainer._after_step = after_step  # type: ignore[method-assign]
        results = Trainer(_vision_cfg(tmp_path / "run")).fit()
    finally:
        Trainer._after_step = original  # type: ignore[method-assign]
        signal.signal(signal.SIGUSR2, previous)
    assert results["steps"] == 6 and "preempted_at_step" not in results
    assert seen == [True]  # once, after results.json was written


def test_save_every_minutes_saves_between_periodic_checkpoints(tmp_path, monkeypatch) -> None:
    import dinov.preemption as preemption

    clock = iter(range(0, 10_000, 40))  # each reading 40 s later: a save every 2 readings
    monkeypatch.setattr(preemption.time, "monotonic", lambda: float(next(clock)))
    Trainer(_vision_cfg(tmp_path / "run", "train.save_every_minutes=1", "train.keep_last=0")).fit()
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2, 4, 6]  # never at checkpoint_every (100); the last one at the end


# ----- the job callable ----------------------------------------------------------------
def test_job_exports_torch_variables_from_submitit_without_touching_cuda_devices(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
                       "SLURM_JOB_NODELIST": "gpu[07-08]", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}.items():
        monkeypatch.setenv(key, value)
    got = export_distributed_env()
    assert got == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("4242"))}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert 20000 <= master_port("4242") < 40000


def test_job_checkpoint_is_a_fresh_copy_that_resumes() -> None:
    job = TrainingJob("dinov.train", "/abs/configs/smoke.yaml", ["train.steps=9", "train.resume=false"])
    delayed = job.checkpoint()
    copy = delayed.function
    assert copy is not job and isinstance(copy, TrainingJob)
    assert (copy.entry, copy.config, copy.overrides) == (job.entry, job.config, job.overrides)
    assert resume_argv(job.config, job.overrides) == [
        "--config", "/abs/configs/smoke.yaml", "train.steps=9", "train.resume=true"]


# ----- submit-time checks --------------------------------------------------------------
ACCEPTANCE = ["--config", "configs/vision/dinov3_vitl16.yaml", "--nodes", "4", "--gpus-per-node", "8",
              "--partition", "p", "--timeout", "4320", "--dry-run"]


def test_dry_run_prints_the_sbatch_script_and_the_resolved_config(capsys) -> None:
    submit.main(ACCEPTANCE)
    out, err = capsys.readouterr()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=p", "#SBATCH --time=4320", "#SBATCH --signal=USR2@120",
                 "-m submitit.core._submit", "# entry: python -m designers.train"):
        assert line in out, line
    assert "arch: vit_large_patch16_dinov3" in out and "resume: true" in out
    assert "not ready: required key 'model.weights'" in err  # listed, not submitted


def _submit_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        submit.main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_submit_refuses_what_would_fail_in_the_queue(tmp_path, capsys) -> None:
    out = f"output_dir={tmp_path / 'run'}"
    assert "unknown config key 'train.stepz'" in _submit_error(
        capsys, "--config", "configs/smoke.yaml", "--entry", "dinov.train", out, "train.stepz=3")
    assert "no entry point accepts this config" in _submit_error(
        capsys, "--config", "configs/smoke.yaml", out, "train.stepz=3")
    err = _submit_error(capsys, "--config", "configs/vision/dinov3_vitl16.yaml", out)
    assert "error: required key 'model.weights'" in err and "error: required key 'data.path'" in err
    missing = tmp_path / "no_such_images"
    assert f"error: data.path={missing}: no such file or directory" in _submit_error(
        capsys, "--config", "configs/smoke.yaml", out, "data.kind=imagefolder", f"data.path={missing}")
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert "output_dir=" in _submit_error(capsys, "--config", "configs/smoke.yaml",
                                          f"output_dir={blocked / 'run'}")
    assert "cannot import" in _submit_error(capsys, "--config", "configs/smoke.yaml", out,
                                            "--entry", "no.such.module")


def test_paths_on_file_systems_not_mounted_here_are_warned_about(tmp_path, capsys) -> None:
    submit.main(["--config", "configs/smoke.yaml", f"output_dir={tmp_path / 'run'}", "data.kind=imagefolder",
                 "data.path=/cluster_only_fs/imagenet/train", "--dry-run"])
    err = capsys.readouterr().err
    assert "warning: data.path=/cluster_only_fs/imagenet/train: not visible from this host" in err
    assert "not ready" not in err


# ----- sweeps ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_2x2_sweep_runs_locally_and_the_collector_averages_its_seeds(tmp_path, capsys) -> None:
    from slurm import collect, sweep

    grid = tmp_path / "grid.yaml"
    root = tmp_path / "sweep"
    grid.write_text(
        f"config: {ROOT / 'configs/smoke.yaml'}\nentry: dinov.train\noutput_root: {root}\n"
        "overrides: [train.steps=2, train.log_every=1, probe.enabled=false, train.plots=false,"
        " train.progress=none, data.num_samples=32, data.batch_size=8]\n"
        "grid:\n  optim.lr: [0.001, 0.002]\n  crops.local_crops_number: [1, 2]\n"
        "seeds: [0, 1]\njob: {timeout: 20}\n")
    jobs = sweep.main([str(grid), "--cluster", "local"])
    assert len(jobs) == 8
    groups = ["lr-0.001__local_crops_number-1", "lr-0.001__local_crops_number-2",
              "lr-0.002__local_crops_number-1", "lr-0.002__local_crops_number-2"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "slurm") == groups
    capsys.readouterr()
    rows = collect.main([str(root), "--metrics", "final_loss,first_logged_loss"])
    table = capsys.readouterr().out
    assert [row["group"] for row in rows] == groups and all(row["n"] == 2 for row in rows)
    for row in rows:
        finals = [json.loads((root / row["group"] / f"seed_{s}" / "results.json").read_text())["final_loss"]
                  for s in (0, 1)]
        assert finals[0] != finals[1]  # the seeds differ
        assert row["final_loss_mean"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        assert row["final_loss_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, rel=1e-9)
        assert row["optim.lr"] in (0.001, 0.002) and row["crops.local_crops_number"] in (1, 2)
    assert table.count("\n") == 2 + 4 and "±" in table
    assert (root / "summary.md").read_text() == table
    csv_lines = (root / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == ("group,optim.lr,crops.local_crops_number,n,done,final_loss_mean,"
                            "final_loss_std,first_logged_loss_mean,first_logged_loss_std")
    assert len(csv_lines) == 5
    # the sweep moved elsewhere and collected from another directory: the same table
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    capsys.readouterr()
    assert collect.main([str(moved), "--metrics", "final_loss,first_logged_loss"]) == rows


def test_sweep_grid_files_are_checked(tmp_path, capsys) -> None:
    from slurm import sweep

    bad = tmp_path / "grid.yaml"
    bad.write_text("config: configs/smoke.yaml\noutput_root: x\ngrid: {optim.lr: 0.1}\n")
    with pytest.raises(SystemExit):
        sweep.main([str(bad), "--dry-run"])
    assert "'grid' must map each dotted key to a non-empty list" in capsys.readouterr().err
    bad.write_text("config: configs/smoke.yaml\noutput_root: x\ngrid: {optim.lrr: [0.1]}\n")
    with pytest.raises(SystemExit):
        sweep.main([str(bad), "--dry-run"])
    assert "optim.lrr" in capsys.readouterr().err
    bad.write_text("config: configs/smoke.yaml\noutput_root: x\ngrid: {optim.lr: [0.1]}\n"
                   "job: {cluster: local}\n")
    with pytest.raises(SystemExit):
        sweep.main([str(bad), "--dry-run"])
    assert "job: 'cluster' is not a job option" in capsys.readouterr().err
    # grid values become overrides that read back as the same values
    assert [sweep._override_text(v) for v in (None, True, 0.001, "mask")] == ["null", "true", "0.001", "mask"]
    for name in ("grid_vsmoke.yaml", "grid_dinov3_vitl16.yaml"):  # the shipped grids expand
        sweep.main([str(ROOT / "configs/ablations" / name), "--dry-run"])
        assert "job(s) of python -m designers.train" in capsys.readouterr().out
