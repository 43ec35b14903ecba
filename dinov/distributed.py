"""Process-group set-up from torchrun or SLURM variables, and DDP / FSDP wrapping.

One code path for a laptop (a single process, no process group), ``torchrun`` and SLURM
(``srun`` or submitit): the rank, world size and local rank are read from the
environment, ``MASTER_ADDR``/``MASTER_PORT`` are derived on SLURM when missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dinov.config import DistributedConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # "node[01-04,07]" -> "node01" without scontrol
    match = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return match.group(1) + (match.group(2) or "") if match else nodelist


def detect_env() -> DistEnv:
    """Rank/world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID...)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = DistEnv(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                      int(os.environ.get("SLURM_LOCALID", 0)))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return env
    return DistEnv()


def init_distributed(cfg: DistributedConfig) -> tuple[DistEnv, torch.device]:
    """Initialise the process group when there are several processes; pick the device."""
    env = detect_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    wants_group = env.world_size > 1 and cfg.strategy != "none"
    if wants_group and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_student(student: nn.ModuleDict, cfg: DistributedConfig, device: torch.device) -> None:
    """Wrap each student part in place: DDP (``ddp``/``auto``) or FSDP2 ``fully_shard`` (``fsdp``)."""
    if not is_distributed() or cfg.strategy == "none":
        return
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in student.values():
            for block in getattr(module, "blocks", []):
                fully_shard(block)
            fully_shard(module)
        return
    device_ids = [device.index] if device.type == "cuda" else None
    for name in list(student.keys()):
        student[name] = nn.parallel.DistributedDataParallel(student[name], device_ids=device_ids)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor
