"""How long a save at the signal takes: the ViT-L recipe's learner state (student and EMA
teacher with their DINO/iBOT heads, AdamW moments) written as the single atomic file and
as a sharded DCP checkpoint, in one process on this machine. Users set the signal delay
(``--signal-delay`` of ``slurm.submit``) above the save time of their state per rank.

Prints one JSON line: the state's size, the seconds of each write (median of ``--repeats``,
each into a fresh directory, fsynced), and dcp / file.

Usage: ``python benchmarks/save.py [--config configs/vision/dinov3_vitl16.yaml] [--repeats N]
[--dir DIR]`` (DIR: a file system like the cluster's checkpoint one; default a temporary
directory).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import tempfile
import time

import torch

import dinov  # noqa: F401  (torchvision shim first)
from designers.train import config_schema
from dinov.checkpoint import rng_state, save_checkpoint
from dinov.config import load_config_with_unset, to_yaml
from dinov.distributed import optimizer_state_dict, sharded_model_and_optimizer
from dinov.sharded import save_sharded
from dinov.train.meta_arch import SSLMetaArch
from dinov.train.optim import build_optimizer


def learner_state(config: str) -> tuple[SSLMetaArch, torch.optim.Optimizer, str]:
    """The recipe's learner (random weights: only the shapes matter) with AdamW moments."""
    cfg, _ = load_config_with_unset(config, ["model.weights=null"], config_schema())
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.student, model.num_blocks, cfg.optim)
    for param in model.student.parameters():  # one step allocates the moments
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, to_yaml(cfg)


def _timed(write: object, root: pathlib.Path, repeats: int) -> list[float]:
    seconds = []
    for i in range(repeats):
        target = root / f"run{i}"
        target.mkdir(parents=True)
        start = time.perf_counter()
        write(target)  # type: ignore[operator]
        seconds.append(time.perf_counter() - start)
        shutil.rmtree(target)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vision/dinov3_vitl16.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    model, optimizer, config = learner_state(args.config)
    common = {"step": 1, "config": config, "rng": rng_state()}
    tensors = sharded_model_and_optimizer(model, optimizer)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))

    def single_file(target: pathlib.Path) -> None:
        state = {**common, "model": model.state_dict(), "optimizer": optimizer_state_dict(model, optimizer)}
        save_checkpoint(target, 1, state, keep_last=1)

    def sharded(target: pathlib.Path) -> None:
        save_sharded(target, 1, tensors, common, {"rng": rng_state()}, 0, 1)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = pathlib.Path(tmp)
        file_s = statistics.median(_timed(single_file, root / "file", args.repeats))
        dcp_s = statistics.median(_timed(sharded, root / "dcp", args.repeats))
    print(json.dumps({"config": args.config, "threads": torch.get_num_threads(),
                      "state_gb": round(size / 1e9, 2), "file_s": round(file_s, 2),
                      "dcp_s": round(dcp_s, 2), "dcp_over_file": round(dcp_s / file_s, 3),
                      "file_gb_per_s": round(size / 1e9 / file_s, 2)}))


if __name__ == "__main__":
    main()
