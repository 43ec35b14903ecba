"""Atomic checkpoints and exact resume.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced,
then renamed over its final name (``os.replace`` is atomic on POSIX), and the directory
is fsynced. A process killed mid-write therefore leaves at most a stray ``*.tmp`` file
and every ``checkpoint_*.pt`` on disk is complete. Only the newest ``keep_last`` are kept.
Sharded checkpoints (directories written through DCP) are :mod:`dinov.sharded`'s.
"""

from __future__ import annotations

import logging
import os
import pathlib
import random
import re
import shutil
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger("dinov.train")

_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")
_SHARDED_NAME = re.compile(r"^checkpoint_(\d{8})$")  # a directory (dinov.sharded)


def checkpoint_path(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints in ``directory``, oldest first: ``checkpoint_<step>.pt`` files
    and sharded ``checkpoint_<step>/`` directories with their DCP metadata (temporaries
    are ignored). Of a step saved both ways the sharded one comes last."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if (m := _NAME.match(path.name)) and path.is_file():
            found.append((int(m.group(1)), 0, path))
        elif (m := _SHARDED_NAME.match(path.name)) and (path / ".metadata").is_file():
            found.append((int(m.group(1)), 1, path))
    return [p for _, _, p in sorted(found)]


def _step_of(path: pathlib.Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def prune_checkpoints(directory: str | pathlib.Path, keep_last: int, saved_step: int) -> None:
    """After saving ``saved_step``: keep the newest ``keep_last`` steps up to it (a step
    saved as a file and as a directory counts once) and remove the older ones.

    Checkpoints of later steps (ones a resume passed over as unreadable, or an earlier
    run's in the same ``output_dir``) are renamed ``<name>.superseded-<time>``, out of the
    way but not deleted: they no longer take a ``keep_last`` place, nor are they resumed.
    """
    found = list_checkpoints(directory)
    later = [p for p in found if _step_of(p) > saved_step]
    for path in later:
        aside = path.with_name(f"{path.name}.superseded-{int(time.time())}")
        log.warning("%s is of a later step than the one just saved (%d): moved to %s",
                    path, saved_step, aside.name)
        os.replace(path, aside)
    steps = sorted({_step_of(p) for p in found if _step_of(p) <= saved_step})
    kept = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    for old in found:
        if old in later or _step_of(old) in kept:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def latest_checkpoint(directory: str | pathlib.Path) -> pathlib.Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str | pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: str | pathlib.Path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | pathlib.Path, text: str) -> None:
    """Replace a text file (results, metrics) so that a kill leaves the old or the new one."""
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(directory: str | pathlib.Path, step: int, state: dict[str, Any],
                    keep_last: int) -> pathlib.Path:
    path = checkpoint_path(directory, step)
    atomic_torch_save(state, path)
    prune_checkpoints(directory, keep_last, step)
    return path


def load_checkpoint(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"checkpoint {path} could not be read: {error}") from error


def load_tensor_file(path: str | pathlib.Path) -> Any:
    """``torch.load(weights_only=True)`` that memory-maps the file when it can.

    Reading a saved config, or only the backbone out of a training checkpoint that also
    holds the other network, the heads and the optimizer state, then touches only the
    tensors used instead of reading the whole file. The mapping is private, so in-place
    edits never reach the file. Files in torch's legacy (non-zip) format cannot be mapped
    and are read whole.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap can only be used" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _export_main(argv: list[str] | None = None) -> None:
    """``python -m dinov.checkpoint export CKPT OUT.pt``: a sharded checkpoint as one file."""
    import argparse
    import json
    import sys

    from dinov.sharded import export_single_file, is_sharded

    parser = argparse.ArgumentParser(prog="python -m dinov.checkpoint",
                                     description="Write the single file the eval tools read "
                                                 "from a sharded (checkpoint.format=dcp) checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="sharded checkpoint -> one .pt file")
    export.add_argument("checkpoint", type=pathlib.Path,
                        help="a checkpoint_<step>/ directory, or a run's checkpoints/ or output_dir "
                             "(its newest sharded checkpoint)")
    export.add_argument("out", type=pathlib.Path)
    args = parser.parse_args(argv)
    source: pathlib.Path = args.checkpoint
    if not is_sharded(source):
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        sharded = [p for p in list_checkpoints(folder) if p.is_dir()]
        if not sharded:
            print(f"error: {source} is not a sharded checkpoint (a checkpoint_<step>/ directory "
                  f"with .metadata) and holds none", file=sys.stderr)
            raise SystemExit(2)
        source = sharded[-1]
    try:
        summary = export_single_file(source, args.out)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({"checkpoint": str(source), **summary}))


if __name__ == "__main__":
    _export_main()
