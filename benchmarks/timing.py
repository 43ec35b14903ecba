"""Timing that survives a noisy neighbour: the settings a benchmark compares run in turns.

On a shared machine load comes and goes; timing setting A for a minute and then setting B
compares the two loads, not the two settings. Here every round runs each setting once
(A B C, A B C, ...), a ratio is taken inside each round, and the reported ratio is the
median of the per-round ratios with their spread (the 25th and 75th percentiles).

A ratio that the work should not produce (a setting that adds work to its reference
measured faster) is flagged and reported as ``null``, with its raw median kept under
``*_raw``, instead of being printed as a result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    """Wait for queued CUDA work: CUDA runs ahead of the host, so time finished work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function in every round; each round calls every function once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ratio_summary(name: str, numerator: list[float], denominator: list[float],
                  at_least_one: bool = False, digits: int = 4) -> dict[str, object]:
    """``{name: median, name_q25, name_q75}`` of the per-round ratios.

    ``at_least_one``: the numerator does strictly more work than the denominator (a
    superset of its operations), so a median below 1 is physically impossible: it is then
    reported as None with ``name_raw`` and a ``name_flag`` saying why.
    """
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    median = statistics.median(ratios)
    q1, q3 = _quartiles(ratios)
    out: dict[str, object] = {name: round(median, digits), f"{name}_q25": round(q1, digits),
                              f"{name}_q75": round(q3, digits)}
    if at_least_one and median < 1.0:
        out[name] = None
        out[f"{name}_raw"] = round(median, digits)
        out[f"{name}_flag"] = ("below 1 although this setting adds work to its reference: "
                               "rerun (the load may have changed within rounds); if it "
                               "persists, the reference does work this setting avoids")
    return out
