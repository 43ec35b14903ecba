"""Per-step schedules (lr, weight decay, teacher momentum, teacher temperature).

Each schedule is a plain array indexed by the global step, so a resumed run reads the
same value at the same step as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinov.config import Config


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``start``, then cosine from ``start`` to ``end``."""
    if total_steps <= 0:
        raise ValueError(f"schedule length must be positive, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n_cosine = total_steps - warmup_steps
    t = np.arange(n_cosine) / max(n_cosine - 1, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, total_steps: int,
                                warmup_steps: int) -> np.ndarray:
    warmup_steps = min(warmup_steps, total_steps)
    ramp = np.linspace(start, end, warmup_steps, endpoint=False)
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)]).astype(np.float64)


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def at(self, step: int) -> dict[str, float]:
        i = min(step, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "weight_decay": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
        }


def build_schedules(cfg: Config) -> Schedules:
    steps, optim = cfg.train.steps, cfg.optim
    lr = cosine_schedule(optim.lr, optim.min_lr, steps, optim.warmup_steps)
    last_layer_lr = lr.copy()
    last_layer_lr[: optim.freeze_last_layer_steps] = 0.0
    return Schedules(
        lr=lr,
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, steps),
        momentum=cosine_schedule(optim.momentum_teacher, optim.final_momentum_teacher, steps),
        teacher_temp=linear_warmup_then_constant(
            cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, steps,
            cfg.loss.warmup_teacher_temp_steps),
        last_layer_lr=last_layer_lr,
    )
