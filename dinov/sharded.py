"""Sharded checkpoints (``checkpoint.format=dcp``) through ``torch.distributed.checkpoint``.

A sharded checkpoint is a directory ``checkpoint_<step>/`` beside the single-file
``checkpoint_<step>.pt`` ones. Every rank writes its own shards of the tensors it is given
(under FSDP each rank holds only its shards; under DDP replicated tensors are written once)
and DCP writes ``.metadata`` last. The run's other state goes in as two kinds of byte
tensors: ``common`` (rank 0: step, config, hook states, history...) and ``rank<r>`` (each
rank its own RNG and pending values), so it is read back with ``torch.load(weights_only=
True)`` and nothing is unpickled. The directory is written as ``.checkpoint_<step>.dcp.tmp``
and renamed once every rank is done: a job killed mid-save leaves only that temporary,
which is ignored and removed at the next start, and the previous checkpoint is used.

Loading reshards: a checkpoint written by N ranks loads on any number of ranks
(:func:`load_tensors`), and :func:`export_single_file` turns one into the single file the
eval tools read (``python -m dinov.checkpoint export CKPT_DIR OUT.pt``).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import warnings
from typing import Any

import torch

from dinov.checkpoint import _fsync_directory, atomic_torch_save, prune_checkpoints

# DCP says so on every single-process save and load; one process is a supported case here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

METADATA = ".metadata"
_DIR_NAME = re.compile(r"^checkpoint_(\d{8})$")
_TMP_SUFFIX = ".dcp.tmp"


def sharded_path(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"checkpoint_{step:08d}"


def is_sharded(path: pathlib.Path) -> bool:
    """A complete sharded checkpoint: a ``checkpoint_<step>`` directory with DCP's metadata."""
    return path.is_dir() and _DIR_NAME.match(path.name) is not None and (path / METADATA).is_file()


def to_bytes_tensor(obj: Any) -> torch.Tensor:
    """``obj`` (plain types and tensors) as a uint8 tensor of its ``torch.save`` bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def from_bytes_tensor(tensor: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), map_location="cpu", weights_only=True)


def _dcp_error() -> type[BaseException]:
    """DCP's error type: it derives from BaseException, so ``except Exception`` (and
    submitit's job wrapper) would let it through; callers re-raise it as RuntimeError."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _planner() -> Any:
    """DCP's default load planner, reading its few non-tensor items (the optimizer's
    param_groups) with ``weights_only=True`` instead of a full unpickle."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()


# ----- save ---------------------------------------------------------------------------------
def save_sharded(directory: str | pathlib.Path, step: int, tensors: dict[str, Any],
                 common: dict[str, Any], rank_state: dict[str, Any], rank: int,
                 keep_last: int) -> pathlib.Path:
    """Write a sharded checkpoint of ``step``; a collective: every rank calls it.

    ``tensors``: nested dicts of (possibly sharded) tensors (model, optimizer); ``common``
    is written by rank 0, ``rank_state`` by each rank for itself. Once the new checkpoint
    is in place rank 0 prunes the old ones (:func:`dinov.checkpoint.prune_checkpoints`).
    """
    import torch.distributed.checkpoint as dcp

    from dinov.distributed import barrier, is_distributed

    directory = pathlib.Path(directory)
    final = sharded_path(directory, step)
    tmp = directory / f".{final.name}{_TMP_SUFFIX}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    state: dict[str, Any] = {**tensors, f"rank{rank}": to_bytes_tensor(rank_state)}
    if rank == 0:
        state["common"] = to_bytes_tensor(common)
    # .metadata last, once every rank's files are written
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
    if rank == 0:
        _fsync_tree(tmp)
        replaced = directory / f".{final.name}.replaced{_TMP_SUFFIX}"
        if final.exists():  # the same step saved again: set aside, so one copy always exists
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_directory(directory)
        shutil.rmtree(replaced, ignore_errors=True)
        prune_checkpoints(directory, keep_last, step)
    barrier()  # a rank that stops or resumes next must find the directory in place
    return final


def _fsync_tree(root: pathlib.Path) -> None:
    for path in root.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(root)


# ----- load ---------------------------------------------------------------------------------
def _metadata(path: pathlib.Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


def check_complete(path: pathlib.Path) -> None:
    """Raise RuntimeError naming the file when a shard the metadata lists is missing or
    shorter than the bytes it should hold (a copy cut short, a disk error)."""
    try:
        metadata = _metadata(path)
    except Exception as error:  # noqa: BLE001 - any unreadable metadata means: not usable
        raise RuntimeError(f"{path / METADATA} cannot be read: {error}") from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            have = file.stat().st_size if file.is_file() else "no file"
            raise RuntimeError(f"{file}: shard incomplete ({have} bytes, {size} expected)")


def _read_bytes_items(path: pathlib.Path, keys: list[str]) -> dict[str, Any]:
    """The ``to_bytes_tensor`` items ``keys`` of a sharded checkpoint, read by this rank
    alone (no collective)."""
    import torch.distributed.checkpoint as dcp

    sizes = _metadata(path).state_dict_metadata
    state = {key: torch.empty(tuple(sizes[key].size), dtype=torch.uint8) for key in keys}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except _dcp_error() as error:
        raise RuntimeError(f"{path}: {_first_line(error)}") from None
    return {key: from_bytes_tensor(value) for key, value in state.items()}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_common(path: pathlib.Path) -> dict[str, Any]:
    """The run state beside the tensors (step, config, hooks...), with ``per_rank``: every
    writing rank's own state in rank order. Raises RuntimeError when the checkpoint is
    incomplete or unreadable."""
    check_complete(path)
    try:
        names = _metadata(path).state_dict_metadata
        ranks = sorted(int(k[4:]) for k in names if re.fullmatch(r"rank\d+", k))
        items = _read_bytes_items(path, ["common", *(f"rank{r}" for r in ranks)])
    except Exception as error:  # noqa: BLE001 - the caller falls back to an older checkpoint
        raise RuntimeError(f"{path} could not be read: {error}") from error
    common = items.pop("common")
    common["per_rank"] = [items[f"rank{r}"] for r in ranks]
    return common


def load_tensors(path: pathlib.Path, template: dict[str, Any]) -> None:
    """Fill ``template`` (nested dicts of tensors shaped and sharded as this run holds
    them) in place from the checkpoint, whatever world size wrote it; a collective."""
    import torch.distributed.checkpoint as dcp

    from dinov.distributed import is_distributed

    try:
        dcp.load(template, checkpoint_id=str(path), planner=_planner(), no_dist=not is_distributed())
    except _dcp_error() as error:  # a shard that does not read or does not fit this run
        raise RuntimeError(f"{path}: {_first_line(error)}") from None


# ----- export -------------------------------------------------------------------------------
def export_single_file(path: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
    """The single-file checkpoint of a sharded one: its run state and full ``model``
    tensors (not the optimizer: the eval tools read weights). Returns a summary."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    common = read_common(path)
    common.pop("per_rank")
    metadata = _metadata(path).state_dict_metadata
    model = {key[len("model."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {f"model.{k}": v for k, v in model.items()}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except _dcp_error() as error:
        raise RuntimeError(f"{path}: {_first_line(error)}") from None
    single = {**common, "model": {k: state[f"model.{k}"] for k in model}}
    atomic_torch_save(single, out)
    return {"step": common.get("step"), "tensors": len(model),
            "parameters": sum(t.numel() for t in model.values()), "out": str(out)}
