"""Process-group set-up from torchrun or SLURM variables, DDP / FSDP2 wrapping, and the
state-dict and RNG plumbing that makes checkpoints independent of how a run was launched.

One code path for a laptop (a single process, no process group), ``torchrun`` and SLURM
(``srun`` or submitit): the rank, world size and local rank are read from the
environment, ``MASTER_ADDR``/``MASTER_PORT`` are derived on SLURM when missing.

Strategies (``dist.strategy``):

- ``auto`` / ``ddp``: the student's parts are wrapped in DDP; the teacher is a plain
  replica on every rank (its EMA sees identical, all-reduced students).
- ``fsdp``: FSDP2 ``fully_shard`` per transformer block plus the root of every student
  part, and the teacher sharded the same way, so the EMA runs on matching local shards.
- ``none``: no process group, even under torchrun.

Checkpoints always hold full (unsharded, wrapper-free) state dicts: one written by a DDP
or FSDP run loads in a single-process run and in the eval tools.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dinov.config import ConfigError, DistributedConfig

STRATEGIES = ("auto", "ddp", "fsdp", "none")
_BLOCK_NAME = re.compile(r"(?:^|\.)blocks\.\d+$")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, number of processes, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, through ``scontrol`` or a parser for when it is absent."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _first_host_of_nodelist(nodelist)


def _first_host_of_nodelist(nodelist: str) -> str:
    """Parse SLURM's compressed host list without ``scontrol``: the first top-level item,
    each bracket range replaced by its first value ("node[01-04,07]" -> "node01",
    "rack[3,5]-x,gpu1" -> "rack3-x")."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end])
    return first or nodelist


def detect_env() -> DistEnv:
    """Rank/world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID...)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        if "SLURM_STEP_NUM_TASKS" not in os.environ:  # srun sets it for every task it starts
            raise ConfigError(
                f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this process was not started by "
                f"srun (no SLURM_STEP_NUM_TASKS): the other ranks would never come. Start the "
                f"run with srun, torchrun or python -m slurm.submit, or set dist.strategy=none "
                f"for one process")
        env = DistEnv(int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                      int(os.environ.get("SLURM_LOCALID", 0)))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return env
    return DistEnv()


def init_distributed(cfg: DistributedConfig) -> tuple[DistEnv, torch.device]:
    """Initialise the process group when there are several processes; pick the device."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"dist.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    try:
        env = detect_env()
    except ConfigError:  # SLURM_NTASKS>1 outside srun: fine for a run that is one process
        if cfg.strategy != "none":
            raise
        env = DistEnv()
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
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    return env, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def uses_fsdp(cfg: DistributedConfig) -> bool:
    """True when the run shards student and teacher (every rank must run teacher forwards)."""
    return is_distributed() and cfg.strategy == "fsdp"


# ----- wrapping ---------------------------------------------------------------------------
@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank.

    Ranks seed their RNG with ``seed + rank`` (different crops and masks per rank), so
    each builds a different random init; DDP would only fix the student, not the teacher
    deep-copied from it, and FSDP does not broadcast at all.
    """
    if not is_distributed():
        return
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        dist.broadcast(tensor.data, src)


def _fully_shard_part(module: nn.Module, mesh: Any, reshard_after_forward: bool | None) -> None:
    """FSDP2 on each transformer block (``...blocks.<i>``), then on the part's root."""
    from torch.distributed.fsdp import fully_shard

    blocks = [sub for name, sub in module.named_modules() if _BLOCK_NAME.search(name)]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)


def wrap_model(student: nn.ModuleDict, teacher: nn.ModuleDict, cfg: DistributedConfig,
               device: torch.device) -> None:
    """Make ranks start identical, then wrap in place: DDP on the student, or FSDP2 on both.

    Call before building the optimizer: ``fully_shard`` replaces parameters by sharded
    DTensors, and an optimizer built earlier would step the stale full tensors.
    """
    if not is_distributed() or cfg.strategy == "none":
        return
    broadcast_module(student)
    broadcast_module(teacher)
    if cfg.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # FSDP2 warns on every root whose output is a view; BackboneOutput.cls/patch are
        # slices of the final norm's output and nothing in dinov updates them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        # Same wrapping, same mesh: teacher shards line up with student shards, so the EMA
        # is a local lerp with no communication. The student keeps FSDP's default (roots
        # stay unsharded between forward and backward); the teacher has no backward, so
        # its roots must reshard right after forward, or the EMA would lerp the
        # temporary all-gathered copy (and meet plain tensors beside DTensors).
        for module in student.values():
            _fully_shard_part(module, mesh, reshard_after_forward=None)
        for module in teacher.values():
            _fully_shard_part(module, mesh, reshard_after_forward=True)
            if hasattr(module, "forward_intermediates"):
                from torch.distributed.fsdp import register_fsdp_forward_method

                # the teacher backbone's feature tap (the online probe's) gathers like
                # forward; the student's is called inside full_parameters (the meta step)
                register_fsdp_forward_method(module, "forward_intermediates")
        return
    device_ids = [device.index] if device.type == "cuda" else None
    for name in list(student.keys()):
        # Every parameter gets a gradient each step (the mask token through torch.where,
        # the backbone is used twice but its graph runs once in one backward), so the
        # default find_unused_parameters=False is right and costs no graph traversal.
        student[name] = nn.parallel.DistributedDataParallel(student[name], device_ids=device_ids)


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """FSDP2: every FSDP unit in ``module`` unsharded for the block and kept so through the
    forwards and backwards run inside it, so code may call submodules directly and edit
    parameters in place (the value estimator's perturbed passes); resharded after, with
    :func:`wrap_model`'s policy restored (blocks reshard after forward, part roots do not).
    A no-op for a module without FSDP units (single process, DDP).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    roots = {id(m) for name, m in module.named_modules()
             if isinstance(m, FSDPModule) and not _BLOCK_NAME.search(name)}
    for unit in units:
        if id(unit) in roots:
            # FSDP2 initialises lazily at the first forward through a root; calling a
            # block directly first would make it a root of its own. No public call does
            # this initialisation (torch 2.13), hence the private one.
            unit._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)
            unit.set_reshard_after_backward(True, recurse=False)


def all_ranks_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is finite on every rank (one host sync, plus one all-reduce).

    A step is skipped on all ranks or on none: a rank that skipped backward alone would
    leave the others waiting in DDP's or FSDP's gradient collectives forever.
    """
    return agree_step(tensor)[0]


def agree_step(loss: torch.Tensor, stop: bool = False, save: bool = False) -> tuple[bool, bool, bool]:
    """What all ranks agree on at a step, in the one all-reduce the step makes anyway:
    (``loss`` finite on every rank, some rank asks to ``stop``, some rank asks to ``save``).

    The two requests (:mod:`dinov.preemption`) ride on the finiteness check, so a signal
    that reached one rank makes every rank save the same step at no extra collective.
    """
    finite = torch.isfinite(loss.detach()).all()
    if not is_distributed():
        return bool(finite), stop, save
    # MIN of (finite, not stop, not save): any rank's request wins, any non-finite rank too
    flags = torch.stack([finite, torch.tensor(not stop, device=finite.device),
                         torch.tensor(not save, device=finite.device)]).to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    agreed_finite, not_stop, not_save = (bool(x) for x in flags.tolist())
    return agreed_finite, not not_stop, not not_save


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a copy; the input itself when not distributed)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_mean_list(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Means over ranks of several tensors with one all-reduce of their concatenation.

    Returns new tensors shaped like the inputs (the inputs themselves when not
    distributed). All tensors must share a dtype and device.
    """
    if not is_distributed() or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors,
                                               strict=True)]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all) concatenated along dim 0 in rank order;
    ``tensor`` itself when not distributed. No gradient flows through the gather."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace every ``param.grad`` by its mean over ranks (a missing one counts as zeros).

    For a module trained outside DDP on each rank's share of a batch (the designer): one
    all-reduce, so it takes identical steps on every rank.
    """
    if not is_distributed():
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p, g in zip(params, all_reduce_mean_list(grads), strict=True):
        p.grad = g


# ----- full state dicts -------------------------------------------------------------------
def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def model_state_dict(model: nn.Module) -> dict[str, Any]:
    """Full, wrapper-free model state (no ``module.`` prefixes, no shards).

    A collective under DDP/FSDP: every rank must call it; only rank 0 gets the tensors
    (others get an empty dict) because it alone writes checkpoints.
    """
    if not is_distributed():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def load_model_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full state dict on every rank (each rank shards it under FSDP)."""
    if not is_distributed():
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # set_model_state_dict pops keys from what it is given: hand it a shallow copy
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state in ``torch.optim`` format (integer ids), with full tensors.

    DDP optimizers are already identical full replicas. FSDP's are gathered with
    ``get_optimizer_state_dict`` (FQN-keyed), then re-keyed to integer ids in parameter
    order, so a single-process run can ``load_state_dict`` it. Collective under FSDP.
    """
    if not _is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not full:  # ranks other than 0 get nothing with cpu_offload
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(fqn, len(ids)) for fqn in group["params"]]})
    return {"state": {ids[fqn]: value for fqn, value in full["state"].items()}, "param_groups": groups}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict`: integer ids -> FQNs -> shards under FSDP."""
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    by_fqn = {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_fqn, options=StateDictOptions(full_state_dict=True))


# ----- sharded state dicts (dinov.sharded) -------------------------------------------------
def checkpoint_format(fmt: str, cfg: DistributedConfig) -> str:
    """``checkpoint.format`` resolved: ``auto`` is ``dcp`` under FSDP, ``file`` otherwise."""
    if fmt != "auto":
        return fmt
    return "dcp" if uses_fsdp(cfg) else "file"


def sharded_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """FQN-keyed model and optimizer state as this rank holds it (its shards under FSDP,
    full tensors otherwise), for ``dcp.save``; no collective, no copy."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded_model_and_optimizer(path: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into this run, resharded to its
    world size (a collective under a process group)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from dinov.sharded import load_tensors

    template = sharded_model_and_optimizer(model, optimizer)
    load_tensors(path, template)
    set_model_state_dict(model, template["model"], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(model, optimizer, template["optimizer"])


# ----- per-rank RNG -----------------------------------------------------------------------
def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_rng_state(state: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint: ``rng_per_rank[rank]`` when the checkpoint
    was written with the same world size, else the single ``rng`` entry (not exact then:
    a different number of ranks draws different crops anyway)."""
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    return state["rng"]
