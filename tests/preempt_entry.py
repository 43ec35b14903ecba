"""A test entry point for ``slurm.job.TrainingJob``: a built-in entry point whose rank
``PREEMPT_RANK`` sends itself a real signal right before step ``PREEMPT_AT_STEP``, once per
``PREEMPT_MARKER`` file (so the requeued job is not signalled again).

Environment: ``PREEMPT_ENTRY`` (dinov.train, designers.train or designers.lm.train),
``PREEMPT_AT_STEP``, ``PREEMPT_RANK``, ``PREEMPT_MARKER``, ``PREEMPT_SIGNAL`` (default
SIGUSR2). The subprocesses of submitit's LocalExecutor import it through PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
import signal
from typing import Any

from slurm.job import entry_module


def _wrapped() -> Any:
    return entry_module(os.environ["PREEMPT_ENTRY"])


def config_schema() -> type:
    return _wrapped().config_schema()


def _trainer_class() -> type:
    if os.environ["PREEMPT_ENTRY"] == "designers.lm.train":
        from designers.lm.train import LMTrainer

        return LMTrainer
    from dinov.train.trainer import Trainer

    return Trainer


def main(argv: list[str] | None = None) -> Any:
    at_step, rank = int(os.environ["PREEMPT_AT_STEP"]), int(os.environ["PREEMPT_RANK"])
    marker = pathlib.Path(os.environ["PREEMPT_MARKER"])
    sig = signal.Signals[os.environ.get("PREEMPT_SIGNAL", "SIGUSR2")]
    trainer = _trainer_class()
    original = trainer.train_step

    def train_step(self: Any, *args: Any) -> Any:
        if self.step == at_step and self.env.rank == rank and not marker.exists():
            marker.write_text(f"{sig.name} at step {at_step} on rank {rank}\n")
            os.kill(os.getpid(), sig)  # delivered before the step's all-reduce
        return original(self, *args)

    trainer.train_step = train_step
    return _wrapped().main(argv)
