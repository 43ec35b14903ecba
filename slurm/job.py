"""The callable a submitit job runs: one training entry point, resumed on every start.

:class:`TrainingJob` is what :mod:`slurm.submit` and :mod:`slurm.sweep` hand to submitit.
On each task it exports the ``torch.distributed`` variables from submitit's job
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; ``CUDA_VISIBLE_DEVICES`` is left as SLURM set it, so
``LOCAL_RANK`` picks the GPU), then runs the entry point's ``main`` in-process with
``train.resume=true``: the first start begins from the configured weights, and every
requeue continues from the newest checkpoint in ``output_dir``.

Preemption: the trainers replace submitit's signal handlers with flag-only ones for the
run, save at the step all ranks agree on, and then rank 0 calls submitit's handler, which
calls :meth:`TrainingJob.checkpoint` (a fresh copy of the job: all state is in the
checkpoint files, none in the callable), requeues the job and exits.

An entry point is a module (or a package with ``__main__``) with ``main(argv)`` returning
its results and ``config_schema()`` returning its config dataclass; ``dinov.train``,
``designers.train`` and ``designers.lm.train`` are the built-in ones.
"""

from __future__ import annotations

import importlib
import os
import zlib
from types import ModuleType
from typing import Any

ENTRIES = ("dinov.train", "designers.train", "designers.lm.train")


def entry_module(entry: str) -> ModuleType:
    """The module that holds ``entry``'s ``main`` and ``config_schema``."""
    try:
        module = importlib.import_module(entry)
    except ImportError as error:
        raise ValueError(f"--entry {entry}: cannot import it ({error})") from error
    if not hasattr(module, "main"):
        try:
            module = importlib.import_module(f"{entry}.__main__")
        except ImportError:
            pass
    for name in ("main", "config_schema"):
        if not callable(getattr(module, name, None)):
            raise ValueError(f"--entry {entry}: {module.__name__} has no {name}() "
                             f"(an entry point needs main(argv) and config_schema())")
    return module


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike from its id (20000-39999)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def export_distributed_env() -> dict[str, str]:
    """Set the ``torch.distributed`` variables from submitit's job environment, replacing
    any inherited from the submitting process (a submission from inside another launcher
    would otherwise make every task wait for that launcher's ranks); returns them."""
    import submitit

    job = submitit.JobEnvironment()
    values = {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // max(job.num_nodes, 1)),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(master_port(job.job_id)),
    }
    os.environ.update(values)
    return values


def _destroy_process_group() -> None:
    """Leave no process group behind: a task whose group is still alive at interpreter
    exit can wait on ranks that already left."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resume_argv(config: str | None, overrides: list[str]) -> list[str]:
    """The entry point's command line on a cluster: the overrides, then ``train.resume=true``."""
    argv = ["--config", config] if config else []
    kept = [item for item in overrides if not item.startswith("train.resume=")]
    return [*argv, *kept, "train.resume=true"]


class TrainingJob:
    """``entry``'s ``main`` on ``config`` + ``overrides`` with ``train.resume=true``.

    Submitit's ``Checkpointable`` contract (a ``checkpoint`` method returning a
    ``DelayedSubmission``) without deriving from it, so this module imports submitit only
    when a job runs or is checkpointed.
    """

    def __init__(self, entry: str, config: str | None, overrides: list[str]) -> None:
        self.entry = entry
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> Any:
        export_distributed_env()
        try:
            return entry_module(self.entry).main(resume_argv(self.config, self.overrides))
        except SystemExit as error:
            # the CLIs' error exits (1: run error, 2: config / resume refused) become the
            # job's error, which submitit records; a requeue's exit passes through
            if error.code in (1, 2):
                raise RuntimeError(f"python -m {self.entry} stopped with exit code {error.code}: "
                                   f"its error line is in this task's log") from None
            raise
        finally:
            _destroy_process_group()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """A fresh copy of this job for the requeue: the run's state is in its checkpoints."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainingJob(self.entry, self.config, self.overrides))

    def __repr__(self) -> str:
        return f"TrainingJob({self.entry!r}, {self.config!r}, {self.overrides!r})"
