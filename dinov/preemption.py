"""Stopping a run at a step boundary without losing a step: preemption signals and the
time-based save.

A cluster announces the end of a job with a signal (SLURM: ``--signal=USR2@<seconds>``
before the time limit, ``SIGTERM`` on preemption). Nothing collective may run inside a
signal handler, and ranks receive the signal at different moments, so the handlers here
only set a flag. The trainers put the flags into the one all-reduce each step already
makes (the agreement that the loss was finite, :func:`dinov.distributed.agree_step`), so
every rank learns at the same step that some rank was told to stop and they all save
that step together; no extra collective runs. ``save_every_minutes`` does the same for
clusters that never send a signal: a rank whose clock says a save is due asks for one.

After the save, :meth:`StopRequests.requeue` hands over to whatever handled the signal
before the run installed its own (submitit's handler on rank 0 checkpoints the job
callable and requeues it); the run then returns so every rank exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("dinov.train")

_Handler = Callable[[int, types.FrameType | None], Any] | int | None


class StopRequests:
    """This rank's requests to stop (a signal came) or to save (the save clock ran out).

    Used as a context manager around the training loop: the flag-only handlers are
    installed on entry and the previous handlers restored on exit. ``local()`` gives the
    requests to put into the step's all-reduce; ``agreed(stop, save)`` records what all
    ranks agreed on.
    """

    def __init__(self, signals: Sequence[str], save_every_minutes: float) -> None:
        self.signals = [signal.Signals[name] for name in signals]  # checked by the config
        self.save_every_s = save_every_minutes * 60.0
        self.received: signal.Signals | None = None
        self.stop = False  # agreed by every rank: save this step and return
        self.save = False  # agreed by every rank: save this step and go on
        self._last_save = time.monotonic()
        self._previous: dict[signal.Signals, _Handler] = {}  # while installed
        self._handed_back: dict[signal.Signals, _Handler] = {}  # after exit, for requeue()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: no preemption signal handlers")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._handed_back = dict(self._previous)
        self._previous.clear()
        if self.received is not None and not self.stop and exc[0] is None:
            # it came after the last step's agreement: no step is left to save, but the
            # time limit is still coming; the handler it had before the run gets it now
            # (submitit's requeues: the requeued job finds the last step and finishes)
            log.info("%s came after the last step: handing it on", self.received.name)
            signal.raise_signal(self.received)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # a flag only: the step boundary does the work (no collective in a handler)
        self.received = signal.Signals(signum)

    def local(self) -> tuple[bool, bool]:
        """(stop, save) as this rank asks for them now."""
        save_due = self.save_every_s > 0 and time.monotonic() - self._last_save >= self.save_every_s
        return self.received is not None, save_due

    def agreed(self, stop: bool, save: bool) -> None:
        self.stop, self.save = self.stop or stop, self.save or save

    def saved(self) -> None:
        """A checkpoint was written: the save clock starts again."""
        self.save = False
        self._last_save = time.monotonic()

    def describe(self) -> str:
        """Why the run stops, for its log line."""
        if self.received is not None:
            return f"{self.received.name} on this rank"
        return "a signal on another rank"

    def requeue(self, is_main: bool) -> None:
        """After the save at a stop, on rank 0: the handler the signal had before the run
        (submitit's for its requeue signal checkpoints the job callable, requeues the job
        and exits the process; its SIGTERM handler only logs, as SLURM requeues a
        preempted job itself). When only another rank got a signal, rank 0 uses the first
        of ``train.preempt_signals`` (SIGUSR2: submitit's). Nothing on other ranks."""
        sig = self.received if self.received is not None else (self.signals[0] if self.signals else None)
        previous = self._handed_back.get(sig) if sig is not None else None
        if not is_main or sig is None or not callable(previous):
            return
        log.info("handing %s to the handler it had before the run (requeue)", sig.name)
        previous(int(sig), None)


def stopped_results(step: int, requests: StopRequests) -> dict[str, Any]:
    """What a run that stopped before ``train.steps`` returns: the step, and for a stop by a
    signal ``preempted_at_step`` (whoever launched the run requeues it) and the signal this
    rank received (None on a rank that stopped because another one was told to)."""
    results: dict[str, Any] = {"stopped_at_step": step}
    if requests.stop:
        results["preempted_at_step"] = step
        results["signal"] = requests.received.name if requests.received is not None else None
    return results
