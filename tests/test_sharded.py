"""Sharded checkpoints (``checkpoint.format=dcp``): exact resume in one process for both
trainers, keep_last, a SIGKILL between the shards and the metadata, world-size changes
(2-rank FSDP -> 1 and 3 ranks for both trainers; the LM's at the same global batch), and the exported single file in ``eval.linear``."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import dinov  # noqa: F401  (torchvision shim first)
from dinov.checkpoint import list_checkpoints, load_checkpoint
from dinov.config import load_config
from dinov.sharded import export_single_file, is_sharded
from dinov.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
VISION = ["probe.enabled=false", "train.plots=false", "train.progress=none", "train.steps=6",
          "train.log_every=1", "train.checkpoint_every=3", "data.num_samples=96",
          "data.batch_size=8", "checkpoint.format=dcp"]


def _vision(out: pathlib.Path, *overrides: str) -> Any:
    return load_config(str(ROOT / "configs/smoke.yaml"), [f"output_dir={out}", *VISION, *overrides])


def _rows(run: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sharded_resume_is_bitwise_and_keep_last_holds(tmp_path) -> None:
    assert Trainer(_vision(tmp_path / "a", "train.stop_at_step=3")).fit() == {"stopped_at_step": 3}
    (only,) = list_checkpoints(tmp_path / "a" / "checkpoints")
    assert is_sharded(only) and only.name == "checkpoint_00000003"
    assert {p.name for p in only.iterdir()} == {".metadata", "__0_0.distcp"}
    Trainer(_vision(tmp_path / "a", "train.resume=true", "train.keep_last=1")).fit()
    Trainer(_vision(tmp_path / "b")).fit()
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["checkpoint_00000006"]
    # the exported single file holds the weights of the uninterrupted run's file checkpoint
    Trainer(_vision(tmp_path / "c", "checkpoint.format=file")).fit()
    export_single_file(tmp_path / "a" / "checkpoints" / "checkpoint_00000006", tmp_path / "a.pt")
    single, exported = load_checkpoint(tmp_path / "c/checkpoints/checkpoint_00000006.pt"), load_checkpoint(tmp_path / "a.pt")
    assert set(single["model"]) == set(exported["model"])
    assert all(torch.equal(single["model"][k], exported["model"][k]) for k in single["model"])
    assert (exported["step"], exported["pos_interp"]) == (single["step"], single["pos_interp"])


def test_the_exported_file_of_a_sharded_checkpoint_runs_in_eval_linear(tmp_path) -> None:
    from dinov.data.synthetic import write_layout
    from eval import linear

    Trainer(_vision(tmp_path / "run", "train.steps=3")).fit()
    done = subprocess.run([sys.executable, "-m", "dinov.checkpoint", "export", str(tmp_path / "run"),
                           str(tmp_path / "export.pt")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["step"] == 3 and summary["checkpoint"].endswith("checkpoint_00000003")
    images = tmp_path / "images"
    write_layout(images, "imagefolder", n=24, seed=0, size=32)
    results = linear.main(["--config", "configs/eval/linear.yaml", f"data.root={images}",
                           f"output_dir={tmp_path / 'linear'}", f"model.weights={tmp_path / 'export.pt'}",
                           "data.resize_size=32", "data.image_size=32", "data.batch_size=8",
                           "data.num_workers=0", "device=cpu", "linear.epochs=2", "linear.batch_size=8"])
    assert results["model"]["weights_format"] == "ours" and results["model"]["patch_size"] == 8
    assert 0.0 <= results["top1"] <= 100.0


def test_a_kill_between_the_shards_and_the_metadata_keeps_the_previous_checkpoint(tmp_path) -> None:
    """A real SIGKILL of ``python -m dinov.train`` inside DCP's save of step 6, after the
    shard files and before ``.metadata``: the next resume uses step 3."""
    out = tmp_path / "run"
    killer = (
        "import os, signal, sys\n"
        "import dinov\n"
        "from torch.distributed.checkpoint import FileSystemWriter\n"
        "finish = FileSystemWriter.finish\n"
        "def dying_finish(self, *a, **k):\n"
        "    if 'checkpoint_00000006' in str(self.path):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return finish(self, *a, **k)\n"
        "FileSystemWriter.finish = dying_finish\n"
        "from dinov.train.__main__ import main\n"
        "main(sys.argv[1:])\n")
    args = ["--config", "configs/smoke.yaml", f"output_dir={out}", *VISION]
    done = subprocess.run([sys.executable, "-c", killer, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint_00000003"]
    partial = checkpoints / ".checkpoint_00000006.dcp.tmp"
    assert partial.is_dir() and not (partial / ".metadata").exists() and any(partial.iterdir())
    Trainer(_vision(out, "train.resume=true")).fit()
    assert not partial.exists()  # removed at the start of the resumed run
    Trainer(_vision(tmp_path / "ref")).fit()
    assert _rows(out) == _rows(tmp_path / "ref")


def test_a_truncated_shard_falls_back_to_the_previous_checkpoint(tmp_path) -> None:
    Trainer(_vision(tmp_path / "a", "train.stop_at_step=6")).fit()
    newest = tmp_path / "a" / "checkpoints" / "checkpoint_00000006" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[:1000])
    trainer = Trainer(_vision(tmp_path / "a", "train.resume=true", "train.steps=7"))
    trainer._maybe_resume()
    assert trainer.step == 3


def test_a_corrupt_shard_of_the_right_size_falls_back_too(tmp_path) -> None:
    """DCP's own error (a BaseException) becomes a RuntimeError, so the fallback sees it."""
    from dinov.runs import newest_readable_checkpoint
    from dinov.sharded import save_sharded

    for step in (1, 2):
        save_sharded(tmp_path, step, {"model": {"w": torch.randn(64, 64)}}, {"step": step}, {"rng": step},
                     rank=0, keep_last=0)
    shard = tmp_path / "checkpoint_00000002" / "__0_0.distcp"
    shard.write_bytes(b"\x5a" * shard.stat().st_size)
    path, state = newest_readable_checkpoint(tmp_path)
    assert path.name == "checkpoint_00000001" and state["step"] == 1


def test_lm_sharded_resume_is_bitwise(tmp_path) -> None:
    from designers.lm.config import LMConfig
    from designers.lm.synthetic import write_default
    from designers.lm.train import LMTrainer

    tiny = write_default(tmp_path / "tiny", n_corpus=300, n_train=20, n_test=10)

    def cfg(out: pathlib.Path, *overrides: str) -> LMConfig:
        return load_config(str(ROOT / "configs/lm/smoke.yaml"),
                           [f"output_dir={out}", f"model.path={tiny['model']}", f"data.path={tiny['corpus']}",
                            "synthetic.dir=null", "train.progress=none", "train.steps=6", "train.log_every=1",
                            "train.checkpoint_every=3", "checkpoint.format=dcp", *overrides], schema=LMConfig)

    assert LMTrainer(cfg(tmp_path / "a", "train.stop_at_step=3")).fit() == {"stopped_at_step": 3}
    assert is_sharded(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    LMTrainer(cfg(tmp_path / "a", "train.resume=true")).fit()
    LMTrainer(cfg(tmp_path / "b")).fit()
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


# ----- other world sizes --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        _JOBS[job](pathlib.Path(root), rank, world)
    finally:
        dist.destroy_process_group()


def _vision_fsdp(root: pathlib.Path, rank: int, world: int) -> None:
    """Continue the 2-rank FSDP checkpoint of step 3 on ``world`` ranks; rank 0 writes the
    full model as loaded (before any step) and the losses of the continuation."""
    from dinov.distributed import model_state_dict

    run = root / f"fsdp_on_{world}"
    if world == 2 and not (root / "fsdp_on_2" / "checkpoints").exists():
        Trainer(_vision(run, "dist.strategy=fsdp", "train.stop_at_step=3")).fit()
    trainer = Trainer(_vision(run, "dist.strategy=fsdp" if world > 1 else "dist.strategy=none",
                              "train.resume=true"))
    trainer._maybe_resume()
    loaded = model_state_dict(trainer.model)
    if rank == 0:
        torch.save({"step": trainer.step, "model": loaded}, root / f"loaded_on_{world}.pt")
    trainer.fit()


def _lm_run(root: pathlib.Path, out: str, *overrides: str) -> None:
    """The LM smoke config on the tiny model written by the test, sharded checkpoints,
    FSDP where there are several ranks, trained to its end (or ``train.stop_at_step``)."""
    from designers.lm.config import LMConfig
    from designers.lm.train import LMTrainer

    tiny = json.loads((root / "tiny.json").read_text())
    cfg = load_config(str(ROOT / "configs/lm/smoke.yaml"),
                      [f"output_dir={root / out}", f"model.path={tiny['model']}", f"data.path={tiny['corpus']}",
                       "synthetic.dir=null", "train.progress=none", "train.log_every=1",
                       "train.checkpoint_every=3", "train.grad_accum=1", "dist.strategy=fsdp", *overrides],
                      schema=LMConfig)
    LMTrainer(cfg).fit()


def _lm_continue(root: pathlib.Path, rank: int, world: int) -> None:
    # the same global batch of 6 sequences on 1, 2 and 3 ranks
    _lm_run(root, f"lm_on_{world}", "train.steps=6", "checkpoint.format=dcp",
            f"train.micro_batch_size={6 // world}", "train.resume=true")


def _lm_first_3_steps(root: pathlib.Path, rank: int, world: int) -> None:
    _lm_run(root, "lm_on_2", "train.steps=6", "checkpoint.format=dcp", "train.micro_batch_size=3",
            "train.stop_at_step=3")


def _lm_lora(root: pathlib.Path, rank: int, world: int) -> None:
    _lm_run(root, f"lora_on_{world}", "train.steps=3", f"train.micro_batch_size={4 // world}",
            "model.lora.enabled=true", "model.lora.dropout=0.0", "optim.lr=1e-2")


_JOBS = {"vision_fsdp": _vision_fsdp, "lm_continue": _lm_continue, "lm_first_3_steps": _lm_first_3_steps,
         "lm_lora": _lm_lora}


def _spawn(job: str, world: int, root: pathlib.Path) -> None:
    mp.spawn(_worker, args=(world, _free_port(), job, str(root)), nprocs=world, join=True)


def _copy_step_3(root: pathlib.Path, source: str, target: str) -> None:
    """A new run directory holding only the 2-rank run's step-3 checkpoint."""
    (root / target / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / source / "checkpoints" / "checkpoint_00000003",
                    root / target / "checkpoints" / "checkpoint_00000003")
    shutil.copy(root / source / "metrics.jsonl", root / target / "metrics.jsonl")


@pytest.mark.slow
def test_a_2_rank_fsdp_checkpoint_loads_on_1_and_3_ranks(tmp_path) -> None:
    _spawn("vision_fsdp", 2, tmp_path)  # steps 1-3 on 2 ranks, saved; then resumed to 6
    step_3 = tmp_path / "fsdp_on_2" / "checkpoints" / "checkpoint_00000003"
    assert sorted(p.name for p in step_3.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # resume keeps the step-3 checkpoint (keep_last 3); the other world sizes start from it
    for world in (1, 3):
        _copy_step_3(tmp_path, "fsdp_on_2", f"fsdp_on_{world}")
    _spawn("vision_fsdp", 3, tmp_path)
    _worker_free_one_process(tmp_path)
    export_single_file(step_3, tmp_path / "step3.pt")
    written = load_checkpoint(tmp_path / "step3.pt")["model"]
    for world in (2, 1, 3):
        loaded = torch.load(tmp_path / f"loaded_on_{world}.pt", weights_only=True)
        assert loaded["step"] == 3
        assert set(loaded["model"]) == set(written)
        for key, tensor in written.items():  # resharded, bitwise
            assert torch.equal(loaded["model"][key], tensor), (world, key)
        losses = [r["loss"] for r in _rows(tmp_path / f"fsdp_on_{world}") if r["step"] > 3]
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _worker_free_one_process(root: pathlib.Path) -> None:
    """The 1-rank continuation, in a subprocess of its own (no process group)."""
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import test_sharded as t; "
            "t._vision_fsdp(pathlib.Path(sys.argv[2]), 0, 1)")
    done = subprocess.run([sys.executable, "-c", code, str(pathlib.Path(__file__).parent), str(root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_lm_fsdp_checkpoint_of_2_ranks_continues_on_1_and_3_with_the_same_losses(tmp_path) -> None:
    """FSDP on 2 and 3 ranks, one plain process: the LM's global batch does not depend on
    the world size, so the continuations take the same steps."""
    from designers.lm.synthetic import write_default

    tiny = write_default(tmp_path / "tiny", n_corpus=300, n_train=20, n_test=10)
    (tmp_path / "tiny.json").write_text(json.dumps({k: str(v) for k, v in tiny.items()}))
    (tmp_path / "lm_on_2").mkdir()
    # first 3 steps on 2 ranks (a stop), then the 2-rank continuation to step 6
    _spawn("lm_first_3_steps", 2, tmp_path)
    for world in (1, 3):
        _copy_step_3(tmp_path, "lm_on_2", f"lm_on_{world}")
    _spawn("lm_continue", 2, tmp_path)
    _spawn("lm_continue", 3, tmp_path)
    _spawn("lm_continue", 1, tmp_path)
    reference = [r["loss"] for r in _rows(tmp_path / "lm_on_2") if r["step"] > 3]
    for world in (1, 3):
        losses = [r["loss"] for r in _rows(tmp_path / f"lm_on_{world}") if r["step"] > 3]
        # only the summation order of the gradient reductions differs
        assert losses == pytest.approx(reference, rel=1e-5), world
    # the FSDP runs' final/ directories hold the full, gathered weights: equal across sizes
    from transformers import AutoModelForCausalLM

    finals = [AutoModelForCausalLM.from_pretrained(str(tmp_path / f"lm_on_{w}" / "final")).state_dict()
              for w in (1, 2, 3)]
    for key, tensor in finals[1].items():
        for other in (finals[0], finals[2]):
            assert torch.allclose(other[key], tensor, rtol=1e-4, atol=1e-6), key


@pytest.mark.slow
def test_lm_lora_under_fsdp_exports_the_merged_model_of_one_process(tmp_path) -> None:
    """Rank 0's LoRA init is broadcast before sharding, so 2 FSDP ranks train what one
    process trains; final/ is merged from the gathered weights."""
    from transformers import AutoModelForCausalLM

    from designers.lm.synthetic import write_default

    tiny = write_default(tmp_path / "tiny", n_corpus=200, n_train=20, n_test=10)
    (tmp_path / "tiny.json").write_text(json.dumps({k: str(v) for k, v in tiny.items()}))
    _spawn("lm_lora", 2, tmp_path)
    _spawn("lm_lora", 1, tmp_path)
    losses = [[r["loss"] for r in _rows(tmp_path / f"lora_on_{w}")] for w in (2, 1)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    two, one = (AutoModelForCausalLM.from_pretrained(str(tmp_path / f"lora_on_{w}" / "final")).state_dict()
                for w in (2, 1))
    assert set(two) == set(one) and not any("lora" in key for key in two)  # merged
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"])).state_dict()
    assert any(not torch.equal(two[k], base[k]) for k in base)  # the adapters were merged in
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-6), key
