"""Multi-process training on CPU (gloo, 2 processes): DDP ranks agree and only rank 0
writes, DDP resume is exact, FSDP2 trains and writes full checkpoints, and the SLURM /
torchrun environment is read correctly.

All 2-process runs happen in one spawn (module fixture) to pay the worker start-up
(``import torch`` ...) once; each test then checks what the workers left on disk.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys
import time
import traceback
from typing import Any

import pytest
import torch

from dinov import distributed
from dinov.checkpoint import latest_checkpoint, load_checkpoint
from dinov.config import load_config
from dinov.train.task import StepHook

SMOKE = "configs/smoke.yaml"
WORLD_SIZE = 2
TIMEOUT_S = 240  # whole spawn; a hung collective fails through gloo's own timeout first
COMMON = ["probe.enabled=false", "train.plots=false", "train.progress=none", "train.steps=4",
          "data.num_samples=64", "data.batch_size=8", "train.log_every=1",
          "train.checkpoint_every=2"]
# (run name, output dir name, extra overrides): run in this order on every rank
JOBS = [
    ("ddp", "ddp", ["dist.strategy=ddp"]),
    ("ddp_stop", "ddp_resumed", ["dist.strategy=ddp", "train.stop_at_step=2"]),
    ("ddp_resume", "ddp_resumed", ["dist.strategy=ddp", "train.resume=true"]),
    # the probe's teacher forwards are collectives under FSDP: every rank must run them
    # the single file under FSDP (gathered on rank 0); the other FSDP jobs write the
    # default there, sharded checkpoints
    ("fsdp", "fsdp", ["dist.strategy=fsdp", "checkpoint.format=file", "probe.enabled=true",
                      "probe.num_train=32", "probe.num_val=32", "probe.epochs=3"]),
    ("ddp_nan", "ddp_nan", ["dist.strategy=ddp", "train.steps=2"]),
    # V-pretraining under DDP (configs/vsmoke.yaml, a meta step every 2 steps)
    ("ddp_vpre", "ddp_vpre", ["dist.strategy=ddp", "feedback.synthetic_head_pool=16",
                              "feedback.synthetic_meta_pool=8", "feedback.head_steps=2"]),
    # the same under FSDP2: the meta step runs on the unsharded student
    ("fsdp_vpre", "fsdp_vpre", ["dist.strategy=fsdp", "feedback.synthetic_head_pool=16",
                                "feedback.synthetic_meta_pool=8", "feedback.head_steps=2"]),
    # augmentation designer with the gradient through the teacher's (Sinkhorn) targets
    ("ddp_vpre_teacher", "ddp_vpre_teacher",
     ["dist.strategy=ddp", "designer.kind=augment", "designer.teacher_gradient=true",
      "feedback.synthetic_head_pool=16", "feedback.synthetic_meta_pool=8", "feedback.head_steps=2"]),
    # the same under FSDP2: the teacher's (sharded) forward keeps a graph to its views
    ("fsdp_vpre_teacher", "fsdp_vpre_teacher",
     ["dist.strategy=fsdp", "designer.kind=augment", "designer.teacher_gradient=true",
      "feedback.synthetic_head_pool=16", "feedback.synthetic_meta_pool=8", "feedback.head_steps=2"]),
]
VPRE = ("ddp_vpre", "fsdp_vpre", "ddp_vpre_teacher", "fsdp_vpre_teacher")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record_writes(root: pathlib.Path, log: list[str]) -> None:
    """Audit hook: every file this process opens for writing, renames or mkdirs under root."""
    prefix = str(root)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], str | pathlib.Path):
            mode = args[1] if isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if writes and str(args[0]).startswith(prefix):
                log.append(str(args[0]))
        elif event in ("os.rename", "os.mkdir") and str(args[0]).startswith(prefix):
            log.append(str(args[1] if event == "os.rename" else args[0]))  # os.replace: os.rename

    sys.addaudithook(hook)


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's model state, unsharded and without wrapper prefixes (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {key: value.detach().clone() for key, value in state.items()}


class _PoisonRank1FirstStep(StepHook):
    """A NaN loss on rank 1 only, at step 0: both ranks must skip that step together."""

    name = "poison"

    def before_step(self, ctx: Any, images: torch.Tensor, task: Any) -> Any:
        if ctx.step == 0 and ctx.learner.rank == 1:
            task.student_global = task.student_global * float("nan")
        return task


def _fresh_heads_fit(cfg: Any, backbone: torch.nn.Module) -> dict[str, Any]:
    """Fresh feedback heads fitted 3 steps on ``backbone`` (each rank: its share of the
    images, gathered features); the test repeats it in one process."""
    from designers.vision.feedback import FeedbackHeads, FeedbackPools

    pools = FeedbackPools(cfg.feedback)
    torch.manual_seed(7)
    heads = FeedbackHeads(backbone, cfg.feedback, pools.num_classes)
    heads.fit(backbone, pools, steps=3)
    return {"fresh_heads": {k: v.clone() for k, v in heads.state_dict().items()
                            if isinstance(v, torch.Tensor)},
            "backbone": {k: v.clone() for k, v in backbone.state_dict().items()}}


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: every job of JOBS in turn, in one gloo process group."""
    import torch.distributed as dist

    from designers.vision.config import VConfig
    from designers.vision.hook import VisionDesignerHook
    from dinov.train.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    out = pathlib.Path(root)
    writes: list[str] = []
    _record_writes(out / "runs", writes)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, run_dir, extra in JOBS:
            overrides = [f"output_dir={out / 'runs' / run_dir}", *COMMON, *extra]
            hooks: list[StepHook] = [_PoisonRank1FirstStep()] if name == "ddp_nan" else []
            if name in VPRE:
                cfg = load_config("configs/vsmoke.yaml", overrides, schema=VConfig)
                hooks = [VisionDesignerHook(cfg)]
            else:
                cfg = load_config(SMOKE, overrides)
            trainer = Trainer(cfg, hooks=hooks)
            start: dict[str, torch.Tensor] = {}
            if name in VPRE:
                start = {k: v.clone() for k, v in hooks[0].designer.state_dict().items()}
            results = trainer.fit()
            state = {"results": results, "weights": _full_weights(trainer.model)}
            if name in VPRE:
                state["designer"] = {k: v.clone() for k, v in hooks[0].designer.state_dict().items()}
                state["designer_start"] = start
                state["heads"] = {k: v.clone() for k, v in hooks[0].heads.state_dict().items()
                                  if isinstance(v, torch.Tensor)}
                state["realised"] = torch.tensor(hooks[0].core.calibration.realised, dtype=torch.float64)
                state["predicted"] = torch.tensor(hooks[0].core.calibration.predicted, dtype=torch.float64)
            if name == "ddp_vpre":
                state.update(_fresh_heads_fit(cfg, trainer.model.backbone))
            torch.save(state, out / f"{name}.rank{rank}.result")
    except BaseException:
        (out / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        (out / f"writes.rank{rank}.json").write_text(json.dumps(writes))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Run JOBS on 2 spawned processes; kill them past TIMEOUT_S."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("dist")
    started = time.perf_counter()
    context = mp.start_processes(_worker, args=(_free_port(), str(root)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    try:
        while not context.join(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - started))):
            if time.perf_counter() - started > TIMEOUT_S:
                pytest.fail(f"2-process runs did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return root


def _result(root: pathlib.Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(root / f"{name}.rank{rank}.result", weights_only=True)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _losses(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_ranks_agree_and_only_rank0_writes(runs: pathlib.Path) -> None:
    rank0, rank1 = _result(runs, "ddp", 0), _result(runs, "ddp", 1)
    _assert_same(rank0["weights"], rank1["weights"])  # student (DDP) and teacher (EMA) alike
    teacher = {k: v for k, v in rank0["weights"].items() if k.startswith("teacher.")}
    assert teacher and len(teacher) < len(rank0["weights"])
    rows = _losses(runs / "runs" / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one line per step: rank 1 wrote none
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert rank0["results"]["final_loss"] == losses[-1] and rank0["results"]["steps"] == 4
    written = {pathlib.Path(p).name for p in json.loads((runs / "writes.rank0.json").read_text())}
    assert {"config.yaml", "metrics.jsonl", "results.json", "checkpoint_00000004.pt"} <= written
    # rank 1 writes only its own shards of the sharded checkpoints (the FSDP jobs' default),
    # into the temporary directory (DCP's writer also makedirs it on every rank)
    rank1_writes = [pathlib.Path(p) for p in json.loads((runs / "writes.rank1.json").read_text())]
    shards = [p for p in rank1_writes if not p.name.endswith(".dcp.tmp")]
    assert shards and all(p.name.startswith("__1_") and p.name.endswith(".distcp")
                          and p.parent.name.endswith(".dcp.tmp") for p in shards), rank1_writes
    sharded = latest_checkpoint(runs / "runs" / "fsdp_vpre" / "checkpoints")
    assert sharded.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {
        p.name for p in sharded.iterdir()}
    state = load_checkpoint(latest_checkpoint(runs / "runs" / "ddp" / "checkpoints"))
    assert not any(".module." in key for key in state["model"])  # DDP prefixes stripped
    assert len(state["rng_per_rank"]) == WORLD_SIZE
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])


def test_ddp_resume_is_exact(runs: pathlib.Path) -> None:
    assert _result(runs, "ddp_stop", 0)["results"] == {"stopped_at_step": 2}
    for rank in range(WORLD_SIZE):
        _assert_same(_result(runs, "ddp", rank)["weights"], _result(runs, "ddp_resume", rank)["weights"])
    assert _losses(runs / "runs" / "ddp") == _losses(runs / "runs" / "ddp_resumed")


def test_fsdp_trains_and_writes_full_checkpoints(runs: pathlib.Path) -> None:
    from dinov.train.meta_arch import SSLMetaArch
    from dinov.train.optim import build_optimizer

    rank0, rank1 = _result(runs, "fsdp", 0), _result(runs, "fsdp", 1)
    _assert_same(rank0["weights"], rank1["weights"])
    assert rank0["results"]["steps"] == 4 and rank0["results"]["final_loss"] is not None
    probe = [rank0["results"]["probe_top1_final"], rank1["results"]["probe_top1_final"]]
    assert probe[0] is not None and probe[0] == probe[1]  # ran on both ranks, same teacher
    state = load_checkpoint(latest_checkpoint(runs / "runs" / "fsdp" / "checkpoints"))
    cfg = load_config(SMOKE, [f"output_dir={runs / 'single'}", *COMMON])
    model = SSLMetaArch(cfg)
    model.load_state_dict(state["model"])  # strict: full, unsharded, wrapper-free keys
    _assert_same(model.state_dict(), rank0["weights"])
    # the same init and data as DDP: the two strategies train the same model, up to the
    # order of the gradient reductions. AdamW turns rounding noise in near-zero gradients
    # (qkv biases) into steps of up to lr, so: nearly every element agrees to 1e-5, and none
    # drifts further than the 4 steps of size <= lr could move it.
    ddp = _result(runs, "ddp", 0)["weights"]
    lr = cfg.optim.lr
    diffs = torch.cat([(value - ddp[key]).abs().flatten() for key, value in rank0["weights"].items()])
    assert (diffs <= 1e-5).float().mean() >= 0.99, (diffs > 1e-5).float().mean()
    assert diffs.max() <= 4 * lr, diffs.max()
    # optimizer state in torch.optim's integer-id format, loadable without a process group
    optimizer = build_optimizer(model.student, model.num_blocks, cfg.optim)
    optimizer.load_state_dict(state["optimizer"])
    assert len(optimizer.state) == len(list(model.student.parameters()))


def test_nonfinite_step_on_one_rank_is_skipped_on_all(runs: pathlib.Path) -> None:
    rank0, rank1 = _result(runs, "ddp_nan", 0), _result(runs, "ddp_nan", 1)
    assert rank0["results"]["nonfinite_steps"] == rank1["results"]["nonfinite_steps"] == 1
    _assert_same(rank0["weights"], rank1["weights"])


def test_single_process_helpers_without_a_group() -> None:
    assert not distributed.is_distributed()
    assert distributed.all_ranks_finite(torch.tensor(1.0))
    assert not distributed.all_ranks_finite(torch.tensor(float("nan")))
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    env = distributed.DistEnv(rank=1, world_size=2)
    assert distributed.rank_rng_state({"rng": "own", "rng_per_rank": ["r0", "r1"]}, env) == "r1"
    # a checkpoint from another world size falls back to the single saved state
    assert distributed.rank_rng_state({"rng": "own", "rng_per_rank": ["r0"]}, env) == "own"


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
                "SLURM_STEP_NUM_TASKS")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _no_scontrol(*args: Any, **kwargs: Any) -> Any:
    raise FileNotFoundError("scontrol")


def test_slurm_env_detection(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(distributed.subprocess, "run", _no_scontrol)  # as on a login-less node
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[01-04,07]")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")  # started by srun
    env = distributed.detect_env()
    assert env == distributed.DistEnv(rank=5, world_size=8, local_rank=1) and not env.is_main
    assert os.environ["MASTER_ADDR"] == "node01"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_slurm_tasks_outside_srun_are_refused(clean_env: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """sbatch --ntasks=8 running python directly: one process that would wait forever."""
    from dinov.config import ConfigError, DistributedConfig

    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "8")
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS=8 but this process was not started by srun"):
        distributed.init_distributed(DistributedConfig())
    # one process is what dist.strategy=none asks for: allowed
    env, _ = distributed.init_distributed(DistributedConfig(strategy="none"))
    assert env == distributed.DistEnv()


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node[01-04,07]", "node01"), ("gpu-a7,gpu-b2", "gpu-a7"), ("solo", "solo"),
    ("rack[3,5]-x,gpu1", "rack3-x"),
])
def test_slurm_nodelist_fallback_parser(clean_env: pytest.MonkeyPatch, nodelist: str, host: str) -> None:
    clean_env.setattr(distributed.subprocess, "run", _no_scontrol)
    assert distributed._first_slurm_host(nodelist) == host


def test_env_precedence_and_single_task(clean_env: pytest.MonkeyPatch) -> None:
    assert distributed.detect_env() == distributed.DistEnv()  # nothing set: one process
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")  # an interactive salloc shell: still one process
    assert distributed.detect_env() == distributed.DistEnv()
    assert "MASTER_ADDR" not in os.environ
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")  # torchrun inside a SLURM job wins over SLURM_*
    assert distributed.detect_env() == distributed.DistEnv(rank=1, world_size=2, local_rank=1)


def test_unknown_strategy_is_an_error(tmp_path: pathlib.Path) -> None:
    from dinov.config import ConfigError, DistributedConfig

    with pytest.raises(ConfigError, match="dist.strategy"):  # from YAML / CLI
        load_config(SMOKE, [f"output_dir={tmp_path}", "dist.strategy=zero3"])
    with pytest.raises(ValueError, match="dist.strategy' must be one of"):  # built in code
        distributed.init_distributed(DistributedConfig(strategy="zero3"))  # the schema refuses it


def test_ddp_v_pretraining_keeps_one_designer(runs: pathlib.Path) -> None:
    """Each rank evaluates V on its own images; the designer gradient is averaged, so the
    designers (and the learners) stay identical across ranks, and they did move."""
    rank0, rank1 = _result(runs, "ddp_vpre", 0), _result(runs, "ddp_vpre", 1)
    _assert_same(rank0["weights"], rank1["weights"])
    _assert_same(rank0["designer"], rank1["designer"])
    assert any(not torch.equal(rank0["designer"][k], rank0["designer_start"][k]) for k in rank0["designer"])
    assert rank0["results"]["designer_meta_steps"] == 2.0
    # heads fitted, g_down and the calibration taken on each rank's half of the feedback
    # batches and averaged: the heads (BatchNorm running statistics included) and the
    # realised L_down changes are the same on both ranks
    _assert_same(rank0["heads"], rank1["heads"])
    assert any("running_mean" in k for k in rank0["heads"])
    assert rank0["realised"].numel() == 2 and torch.equal(rank0["realised"], rank1["realised"])


def test_ddp_teacher_gradient_keeps_one_designer(runs: pathlib.Path) -> None:
    """designer.teacher_gradient under DDP: the differentiable Sinkhorn sums over ranks
    (other ranks' terms constant) and the averaged designer gradient keep ranks equal."""
    rank0, rank1 = _result(runs, "ddp_vpre_teacher", 0), _result(runs, "ddp_vpre_teacher", 1)
    _assert_same(rank0["designer"], rank1["designer"])
    _assert_same(rank0["weights"], rank1["weights"])
    assert rank0["results"]["designer_meta_steps"] == 2.0
    assert any(not torch.equal(rank0["designer"][k], rank0["designer_start"][k]) for k in rank0["designer"])
    assert all(torch.isfinite(v).all() for v in rank0["designer"].values())


@pytest.mark.parametrize("job", ["vpre", "vpre_teacher"])
def test_fsdp_v_pretraining_matches_ddp(runs: pathlib.Path, job: str) -> None:
    """Under FSDP2 the meta step runs on the unsharded student (full_parameters): the
    designer, V and the learner match the DDP run of the same config, with and without
    the designer gradient through the (sharded) teacher's targets."""
    fsdp0, fsdp1 = _result(runs, f"fsdp_{job}", 0), _result(runs, f"fsdp_{job}", 1)
    ddp = _result(runs, f"ddp_{job}", 0)
    _assert_same(fsdp0["designer"], fsdp1["designer"])
    _assert_same(fsdp0["weights"], fsdp1["weights"])
    assert fsdp0["results"]["designer_meta_steps"] == 2.0
    assert any(not torch.equal(fsdp0["designer"][k], fsdp0["designer_start"][k]) for k in fsdp0["designer"])
    for key in ddp["designer"]:
        torch.testing.assert_close(fsdp0["designer"][key], ddp["designer"][key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fsdp0["predicted"], ddp["predicted"], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fsdp0["realised"], ddp["realised"], rtol=1e-3, atol=1e-7)
    assert fsdp0["weights"].keys() == ddp["weights"].keys()
    for key in ddp["weights"]:
        torch.testing.assert_close(fsdp0["weights"][key], ddp["weights"][key], rtol=1e-3, atol=1e-4)


def test_ddp_head_fit_equals_one_process(runs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Each rank ran the backbone on half of every head batch; the gathered features made
    the fit the one a single process takes on the whole batches."""
    from designers.vision.config import VConfig
    from designers.vision.feedback import FeedbackHeads, FeedbackPools
    from dinov.models import build_backbone

    rank0 = _result(runs, "ddp_vpre", 0)
    job = next(extra for name, _, extra in JOBS if name == "ddp_vpre")
    overrides = [o for o in job if not o.startswith("dist.")]
    cfg = load_config("configs/vsmoke.yaml", [f"output_dir={tmp_path}", *overrides],
                      schema=VConfig)
    backbone = build_backbone(cfg.model)
    backbone.load_state_dict(rank0["backbone"])
    pools = FeedbackPools(cfg.feedback)
    torch.manual_seed(7)
    heads = FeedbackHeads(backbone, cfg.feedback, pools.num_classes)
    before = {k: v.clone() for k, v in heads.state_dict().items() if isinstance(v, torch.Tensor)}
    heads.fit(backbone, pools, steps=3)
    fitted = {k: v for k, v in heads.state_dict().items() if isinstance(v, torch.Tensor)}
    assert fitted.keys() == rank0["fresh_heads"].keys()
    assert any(not torch.equal(before[k], fitted[k]) for k in fitted)
    for key in fitted:
        torch.testing.assert_close(rank0["fresh_heads"][key], fitted[key], rtol=1e-4, atol=1e-5,
                                   msg=key)
