"""The one-step surrogate's health check: predicted against realised ΔL_down.

A meta step records ``L_down`` on its feedback meta batch and the value ``V``; after the
learner's step the same batch gives ``L_down`` again. The surrogate predicts
``ΔL_down = −lr·V`` (DESIGN.md section 3, "Diagnostics"); the Pearson r of predicted
against realised changes over a run is its health signal. Modality-free: a modality
supplies the two ``L_down`` values, this module keeps the records and their state.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def pearson_r(x: list[float], y: list[float]) -> float:
    """Pearson correlation of two equal-length lists; nan below 3 points or with no spread."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


class Calibration:
    """Predicted and realised ΔL_down of every completed meta step, and the pending one."""

    def __init__(self) -> None:
        self.predicted: list[float] = []
        self.realised: list[float] = []
        self.pending: tuple[float, float, Any] | None = None  # (L_down before, V, meta batch)

    def expect(self, l_down_before: float, value: float, meta_batch: Any) -> None:
        """A meta step took ``V`` with ``L_down`` of ``meta_batch`` before the learner step."""
        self.pending = (l_down_before, value, meta_batch)

    def realise(self, lr: float, l_down_after: float) -> tuple[float, float] | None:
        """Close the pending record with ``L_down`` after the learner step at ``lr``; returns
        (predicted, realised), or None for a non-finite ``l_down_after`` (not recorded:
        one NaN pair would make every later r nan)."""
        assert self.pending is not None, "realise() without a pending meta step"
        before, value, _ = self.pending
        self.pending = None
        if not math.isfinite(l_down_after):
            return None
        pair = (-lr * value, l_down_after - before)
        self.predicted.append(pair[0])
        self.realised.append(pair[1])
        return pair

    @property
    def r(self) -> float:
        return pearson_r(self.predicted, self.realised)

    def state_dict(self) -> dict[str, Any]:
        return {"predicted": list(self.predicted), "realised": list(self.realised)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predicted = list(state["predicted"])
        self.realised = list(state["realised"])
        self.pending = None
