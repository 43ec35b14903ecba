"""What every trainer's run in an ``output_dir`` shares, whatever it trains: the errors
that end a run (with their exit codes), the counter of skipped non-finite steps, and what a
resume checks and repairs before the run continues.

- :class:`RunError` (exit code 1), :class:`ResumeError` (2), :class:`NonFiniteLossError` (1);
- :class:`NonFiniteSteps`: one counter and one stop rule for every skipped part of a step
  (a learner loss, a meta step's stage), by part;

- :func:`newest_readable_checkpoint`: the newest checkpoint that loads (a file, or a
  sharded directory whose shards are complete and whose run state reads); a truncated or
  unreadable newer file (disk error, an interrupted copy, a full quota) is skipped with a
  warning naming it, so an intact older checkpoint is used instead of stopping the run.
- :func:`check_resume_config`: the checkpoint's saved config against this run's. A
  checkpoint of the other trainer (``dinov.train`` vs ``designers.train``) or a changed
  architecture (the schema's ``ARCHITECTURE_KEYS``: backbone, heads, designer kind, ...)
  is refused with one line naming the keys; other changes are warned about and then
  used, which is how a run is extended (``train.steps``) or its logging changed.
- :func:`resume_from_newest`: both of the above, then the trainer's ``load_state_dict``;
  a state that does not fit (a shape no config key explains) is one ResumeError.
- :func:`read_metrics` / :func:`truncate_metrics`: ``metrics.jsonl`` rows, tolerating the
  torn last line a killed write leaves (skipped with a warning).
- :func:`remove_stale_temporaries`: partial files of killed checkpoint writes (one
  checkpoint each: gigabytes at ViT-L scale).
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from dinov.checkpoint import atomic_write_text, list_checkpoints, load_checkpoint
from dinov.config import to_yaml
from dinov.sharded import read_common

log = logging.getLogger("dinov.train")

# Keys that differ between a run and its resume by design.
_EXPECTED_TO_DIFFER = ("output_dir", "train.resume", "train.stop_at_step", "train.progress",
                       "train.plots")


class RunError(RuntimeError):
    """A run cannot go on; the CLIs print it as one ``error:`` line and exit ``exit_code``."""

    exit_code = 1


class ResumeError(RunError):
    """The checkpoint in ``output_dir`` cannot be continued by this run's config."""

    exit_code = 2


class NonFiniteLossError(RunError):
    """Too many steps had a NaN or infinite loss (or meta step: any part a hook guards)."""


class NonFiniteSteps:
    """Skipped non-finite parts of steps: one count, by part, and one stop rule.

    ``record(part, step)`` counts and warns; more than ``limit`` skipped parts in total
    raise :class:`NonFiniteLossError` naming the counts per part.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.parts: dict[str, int] = {}

    def record(self, part: str, step: int) -> None:
        self.total += 1
        self.parts[part] = self.parts.get(part, 0) + 1
        log.warning("step %d: non-finite %s, skipped (%d skipped so far)", step, part, self.total)
        if self.total > self.limit:
            parts = ", ".join(f"{name}: {n}" for name, n in self.parts.items())
            raise NonFiniteLossError(
                f"{self.total} skipped non-finite steps ({parts}) exceed "
                f"train.max_nonfinite_steps={self.limit}; stopping at step {step}")

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "parts": dict(self.parts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.parts = int(state["total"]), dict(state["parts"])


def _read(path: pathlib.Path) -> dict[str, Any]:
    if path.is_dir():  # sharded: the run state now, the tensors in load_state_dict
        return {**read_common(path), "sharded_path": path}
    return load_checkpoint(path)


def newest_readable_checkpoint(directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, with its state; None if there is none.

    With several ranks, rank 0 chooses and every rank reads that one: a rank that fell
    back on its own (a read error only it saw) would resume another step than the others.
    Raises ResumeError when checkpoints exist but none can be read (starting fresh would
    overwrite them), or when the chosen one does not read on this rank.
    """
    import torch.distributed as dist

    from dinov.distributed import broadcast_object, is_distributed

    candidates = list_checkpoints(directory)
    chosen: tuple[pathlib.Path, dict[str, Any]] | None = None
    if not is_distributed() or dist.get_rank() == 0:
        chosen = _newest_that_reads(candidates)
    if is_distributed():
        path = broadcast_object(str(chosen[0]) if chosen else None)
        if chosen is None and path is not None:
            try:
                chosen = (pathlib.Path(path), _read(pathlib.Path(path)))
            except RuntimeError as error:
                raise ResumeError(f"rank 0 resumes from {path}, which this rank cannot read "
                                  f"({error})") from error
    if chosen is None and candidates:
        raise ResumeError(f"none of the {len(candidates)} checkpoints in {directory} can be read "
                          f"(newest: {candidates[-1].name}); move them away to start fresh")
    return chosen


def _newest_that_reads(candidates: list[pathlib.Path]) -> tuple[pathlib.Path, dict[str, Any]] | None:
    for path in reversed(candidates):
        try:
            return path, _read(path)
        except RuntimeError as error:
            log.warning("skipping unreadable checkpoint %s (%s); trying the one before it",
                        path, error)
    return None


def resume_from_newest(directory: pathlib.Path, cfg: Any,
                       load_state_dict: Callable[[dict[str, Any]], None]) -> pathlib.Path | None:
    """Load the newest readable checkpoint of ``directory`` into a trainer, once its config
    is accepted; the checkpoint's path, or None (with a log line) when there is none."""
    found = newest_readable_checkpoint(directory)
    if found is None:
        log.info("train.resume=true but no checkpoint in %s: starting fresh", directory)
        return None
    path, state = found
    check_resume_config(state, cfg, path)
    try:
        load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:  # a shape no config key explains
        first = str(error).strip().splitlines()[0]
        raise ResumeError(f"cannot resume {path}: its state does not fit this run ({first})") from error
    return path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"section.key": leaf value} (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_architecture(key: str, architecture_keys: tuple[str, ...]) -> bool:
    return any(key == arch or key.startswith(arch + ".") for arch in architecture_keys)


def check_resume_config(state: dict[str, Any], cfg: Any, path: pathlib.Path) -> None:
    """Refuse a checkpoint this config cannot continue; warn about other changed keys.

    ``cfg`` is the run's config object: its class's ``TRAINER`` names the entry point that
    writes such checkpoints, and ``ARCHITECTURE_KEYS`` (dotted keys or whole sections) what
    the checkpoint's tensors and states are shaped by.
    """
    saved = OmegaConf.to_container(OmegaConf.create(state["config"]))
    current = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    assert isinstance(saved, dict) and isinstance(current, dict)
    # older checkpoints name no trainer: a config section the other trainer lacks tells
    writer = state.get("trainer") or ("designers.train" if "designer" in saved else "dinov.train")
    ours = getattr(type(cfg), "TRAINER", "dinov.train")
    if writer != ours:
        raise ResumeError(f"{path} was written by python -m {writer}, not by python -m {ours}: "
                          f"resume it with the entry point that wrote it, or use a new output_dir")
    before, after = _flatten(saved), _flatten(current)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in _EXPECTED_TO_DIFFER)
    architecture_keys: tuple[str, ...] = getattr(type(cfg), "ARCHITECTURE_KEYS", ())
    refused = [k for k in changed if _is_architecture(k, architecture_keys)]
    if refused:
        changes = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in refused)
        raise ResumeError(f"cannot resume {path}: the architecture changed ({changes}); "
                          f"restore these keys or use a new output_dir")
    if changed:
        changes = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        log.warning("resuming %s with a changed config: %s", path, changes)


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line that is not JSON (the torn last line of a
    killed write) is skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (a write cut short?): skipped", path, number)
    return rows


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Keep the rows up to ``step``: an interrupted run logged rows after its checkpoint."""
    if path.exists():
        kept = [row for row in read_metrics(path) if row["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def remove_stale_temporaries(directory: pathlib.Path) -> None:
    """Delete the partial files of killed checkpoint writes (``.<name>.<pid>.tmp``)."""
    if not directory.is_dir():
        return
    for stale in directory.glob(".*.tmp"):
        log.warning("removing %s: a checkpoint write that was cut short", stale)
        if stale.is_dir():  # a sharded checkpoint's directory (dinov.sharded)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
