"""The modality-free meta step (DESIGN.md section 3): when a meta step runs, the designer's
optimizer step on ``−V + R``, the controls, the calibration records and their state.

:class:`MetaCore` is what the vision hook (:mod:`designers.vision.hook`) and the language
model's trainer drive. The modality supplies three things:

- the designer (a :class:`~designers.registry.TaskDesigner`, built from the registry);
- ``feedback()``: the downstream gradient ``g_down`` on the aligned parameters, its loss
  ``L_down`` and the meta batch it was taken on (:class:`Feedback`);
- ``value(direction)``: ``V`` along ``direction`` (``g_down``, or the random control's
  direction) with a graph to the designer, and the designer's regulariser.

The core checks each stage for non-finite values (all ranks agree; a skipped meta step
is counted with the learner's skipped steps, :class:`NonFiniteMetaStep`), takes the Adam
step of the designer alone (``autograd.grad`` on its parameters: no learner ``.grad`` is
written; under DDP the gradient is averaged over ranks), and records the calibration
pair once the modality reports ``L_down`` after the learner step.

Controls: ``fixed`` (the designer at its initialisation shapes every task and is never
updated: no meta step, no feedback) and ``feedback_mode="random"`` (``g_down`` replaced by
a seeded Gaussian direction of the same global norm, drawn on the CPU from a generator
that advances every meta step and is checkpointed; the real ``g_down`` is still computed
for its norm, so both cost the same).

Imports nothing of the learner's models, data, losses or trainer, nor of ``eval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from designers.calibration import Calibration
from dinov.distributed import all_ranks_finite, average_gradients

FEEDBACK_MODES = ("real", "random")


class NonFiniteMetaStep(Exception):
    """A stage of the meta step gave NaN or inf: the step is skipped (``part`` says where)."""

    def __init__(self, part: str) -> None:
        super().__init__(part)
        self.part = part


@dataclass
class Feedback:
    """What the modality's feedback stage gives the core."""

    g_down: list[Tensor]  # detached, shaped like the aligned parameters
    l_down: Tensor  # scalar, detached
    meta_batch: Any  # re-evaluated after the learner step for the calibration
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the heads' losses


@dataclass(frozen=True)
class MetaSchedule:
    """Meta steps at ``burn_in, burn_in + every, ...``."""

    every: int
    burn_in: int

    def is_meta_step(self, step: int) -> bool:
        return step >= self.burn_in and (step - self.burn_in) % self.every == 0


def random_direction(like: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction with the global L2 norm of ``like`` (the random-feedback control).

    Drawn on the CPU in float64, so a seed gives the same direction on every device.
    """
    norm = torch.sqrt(sum(g.double().square().sum() for g in like))  # type: ignore[arg-type]
    noise = [torch.randn(g.shape, generator=generator, dtype=torch.float64) for g in like]
    noise_norm = math.sqrt(sum(float(n.square().sum()) for n in noise))
    scale = float(norm) / max(noise_norm, 1e-30)
    return [(n * scale).to(device=g.device, dtype=g.dtype) for n, g in zip(noise, like, strict=True)]


class MetaCore:
    """One designer's meta learning: schedule, controls, update, calibration, state."""

    def __init__(self, designer: nn.Module, *, every: int, burn_in: int, lr: float,
                 fixed: bool = False, feedback_mode: str = "real", seed: int = 0) -> None:
        if feedback_mode not in FEEDBACK_MODES:
            raise ValueError(f"feedback mode must be one of {FEEDBACK_MODES}, got {feedback_mode!r}")
        self.designer = designer
        self.schedule = MetaSchedule(every, burn_in)
        self.fixed = fixed
        self.feedback_mode = feedback_mode
        self.optimizer = torch.optim.Adam(designer.parameters(), lr=lr)
        self.random_generator = torch.Generator().manual_seed(seed)
        self.calibration = Calibration()
        self.meta_steps = 0
        self.last_value = math.nan

    def is_meta_step(self, step: int) -> bool:
        return not self.fixed and self.schedule.is_meta_step(step)

    def direction(self, g_down: list[Tensor]) -> list[Tensor]:
        """The direction V is taken along: ``g_down``, or the random control's."""
        if self.feedback_mode == "random":
            return random_direction(g_down, self.random_generator)
        return g_down

    def meta_step(self, feedback: Callable[[], Feedback],
                  value: Callable[[list[Tensor]], tuple[Tensor, Tensor]],
                  record_nonfinite: Callable[[str], None]) -> dict[str, float] | None:
        """Feedback, V, and the designer's step on ``−V + R``; the stage metrics, or None
        when a stage was not finite (then nothing changed and ``record_nonfinite`` was told)."""
        try:
            got = feedback()
            norms = torch._foreach_norm(got.g_down)
            if not all_ranks_finite(torch.stack([got.l_down.float(), *norms])):
                raise NonFiniteMetaStep("feedback gradient g_down (or L_down)")
            v, reg = value(self.direction(got.g_down))
            if not all_ranks_finite(torch.stack([v.detach().float(), reg.detach().float()])):
                raise NonFiniteMetaStep("value V (or the designer's regulariser)")
            if not self.update(-v + reg):
                raise NonFiniteMetaStep("designer gradient")
        except NonFiniteMetaStep as skipped:
            record_nonfinite(f"meta step: {skipped.part}")
            return None
        l_down, self.last_value = float(got.l_down), float(v.detach())
        self.calibration.expect(l_down, self.last_value, got.meta_batch)
        self.meta_steps += 1
        g_norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        return {"V": self.last_value, "L_down": l_down, "g_down_norm": g_norm,
                "regulariser": float(reg.detach()), **got.metrics}

    def update(self, loss: Tensor) -> bool:
        """One Adam step of the designer only; False (and no step) for a non-finite gradient.

        ``autograd.grad`` on the designer's parameters: the learner's ``.grad`` is never
        written (a plain ``backward`` would fill the learner weights' grads).
        """
        params = [p for p in self.designer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        # every rank evaluated V on its own inputs: one designer, the average gradient
        average_gradients(params)
        finite = all_ranks_finite(torch.stack(torch._foreach_norm([p.grad for p in params])))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def realise(self, lr: float, l_down_after: float,
                record_nonfinite: Callable[[str], None]) -> dict[str, float]:
        """The calibration pair of the meta step taken before this learner step."""
        pair = self.calibration.realise(lr, l_down_after)
        if pair is None:
            record_nonfinite("calibration: L_down after the learner step")
            return {}
        return {"predicted_delta": pair[0], "realised_delta": pair[1]}

    def summary(self) -> dict[str, float]:
        """What results.json reports of the designer."""
        if self.fixed:
            return {}
        return {"calibration_r": self.calibration.r, "designer_V": self.last_value,
                "designer_meta_steps": float(self.meta_steps)}

    def state_dict(self) -> dict[str, Any]:
        if self.fixed:  # the constant designer only
            return {"designer": self.designer.state_dict()}
        return {
            "designer": self.designer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "random_generator": self.random_generator.get_state(),
            "calibration": self.calibration.state_dict(),
            "meta_steps": self.meta_steps,
            "last_value": self.last_value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.designer.load_state_dict(state["designer"])
        if self.fixed:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.random_generator.set_state(state["random_generator"])
        self.calibration.load_state_dict(state["calibration"])
        self.meta_steps = int(state["meta_steps"])
        self.last_value = float(state["last_value"])
