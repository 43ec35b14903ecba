"""The trainer's extension point: how a batch becomes a self-supervised task, and the
hooks called around every learner step.

:class:`MultiCropTaskBuilder` turns a batch of images into the default :class:`Task`
(the student's global and local views, the teacher's views and the iBOT masks: DINO
multicrop + iBOT block masks). A :class:`StepHook` may replace that task before the
learner step (designed views) and report values after it. Its contract is narrow:

- :meth:`StepHook.setup` runs once, when the trainer is built, before a resume loads
  any state: a hook builds what it owns there (never lazily), from a
  :class:`LearnerContext` (the learner's model and device, how it is distributed, and
  the trainer's one counter of skipped non-finite steps);
- :meth:`StepHook.before_step` / :meth:`StepHook.after_step` get a :class:`StepContext`
  (step, learner, this step's schedule values), not the trainer; what ``after_step``
  returns is written to this step's ``metrics.jsonl`` row as ``<hook name>/<key>``;
- :meth:`StepHook.summary` goes into ``results.json``; ``state_dict`` into checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dinov.config import Config
from dinov.data.masking import PatchMasks, sample_block_masks
from dinov.data.multicrop import MultiCropAugmentation

if TYPE_CHECKING:
    from dinov.train.meta_arch import SSLMetaArch


@dataclass
class Task:
    """One learner step's inputs. Global views are view-major: rows v*B:(v+1)*B are view v."""

    student_global: Tensor  # (n_global*B, 3, G, G)
    teacher_global: Tensor  # (n_global*B, 3, G, G); the same views unless a designer splits them
    local: Tensor  # (n_local*B, 3, L, L)
    masks: PatchMasks  # iBOT masks of the student's global views
    n_global: int
    n_local: int
    # (n_global*B, h*w) float, equal to masks.masks but carrying a token-mask designer's
    # straight-through gradient; None for the default task
    soft_masks: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.student_global.shape[0] // self.n_global

    def detached(self) -> Task:
        """The same task with every view cut from any designer graph."""
        return dataclasses.replace(
            self,
            student_global=self.student_global.detach(),
            teacher_global=self.teacher_global.detach(),
            local=self.local.detach(),
            soft_masks=None,  # equal to masks.masks, which the learner then uses
        )

    def student_masks(self) -> Tensor:
        """The masks the student's global views are embedded with (soft when designed)."""
        return self.masks.masks if self.soft_masks is None else self.soft_masks

    def ibot_weights(self) -> Tensor:
        """iBOT weights of the masked patches; times the soft mask (1 in value) when designed."""
        if self.soft_masks is None:
            return self.masks.weights
        return self.masks.weights * self.soft_masks.flatten()[self.masks.indices]

    def rows(self, start: int, stop: int) -> Task:
        """The task of images ``start..stop-1`` only (every view of each), iBOT masks reweighted.

        The iBOT weights are recomputed for the smaller set of crops, so the loss of the
        rows is the loss the same images would have as a batch of their own.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows must satisfy 0 <= start < stop <= {self.batch_size}, "
                             f"got [{start}, {stop})")
        if (start, stop) == (0, self.batch_size):
            return self

        def pick(views: Tensor, n_views: int) -> Tensor:
            return views.unflatten(0, (n_views, -1))[:, start:stop].flatten(0, 1)

        soft = self.soft_masks
        return dataclasses.replace(
            self,
            student_global=pick(self.student_global, self.n_global),
            teacher_global=pick(self.teacher_global, self.n_global),
            local=pick(self.local, self.n_local) if self.n_local > 0 else self.local,
            masks=PatchMasks.from_masks(pick(self.masks.masks, self.n_global)),
            soft_masks=None if soft is None else pick(soft, self.n_global),
        )

    @staticmethod
    def concat(first: Task, second: Task) -> Task:
        """The task of ``first``'s images followed by ``second``'s (inverse of :meth:`rows`)."""
        if (first.n_global, first.n_local) != (second.n_global, second.n_local):
            raise ValueError("cannot concatenate tasks with different numbers of views")

        def join(a: Tensor, b: Tensor, n_views: int) -> Tensor:
            return torch.cat([a.unflatten(0, (n_views, -1)), b.unflatten(0, (n_views, -1))],
                             1).flatten(0, 1)

        g, loc = first.n_global, first.n_local
        soft = None
        if first.soft_masks is not None or second.soft_masks is not None:
            soft = join(first.student_masks().float(), second.student_masks().float(), g)
        return Task(
            student_global=join(first.student_global, second.student_global, g),
            teacher_global=join(first.teacher_global, second.teacher_global, g),
            local=join(first.local, second.local, loc) if loc > 0 else first.local,
            masks=PatchMasks.from_masks(join(first.masks.masks, second.masks.masks, g)),
            n_global=g, n_local=loc, soft_masks=soft)

    def to(self, device: torch.device) -> Task:
        masks = PatchMasks(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self.masks)))
        return dataclasses.replace(
            self,
            student_global=self.student_global.to(device, non_blocking=True),
            teacher_global=self.teacher_global.to(device, non_blocking=True),
            local=self.local.to(device, non_blocking=True),
            masks=masks,
            soft_masks=None if self.soft_masks is None else self.soft_masks.to(device),
        )


class MultiCropTaskBuilder(nn.Module):
    """The default task: DINO multicrop on kornia plus iBOT block masks."""

    def __init__(self, cfg: Config, patch_grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.augment = MultiCropAugmentation(cfg.crops)
        self.patch_grid = patch_grid

    def forward(self, images: Tensor) -> Task:
        crops = self.augment(images)
        n_global_crops = crops.global_crops.shape[0]
        masks = sample_block_masks(n_global_crops, self.patch_grid, self.cfg.masks)
        masks = PatchMasks(*(t.to(images.device) for t in dataclasses.astuple(masks)))
        return Task(crops.global_crops, crops.global_crops, crops.local_crops, masks,
                    crops.n_global, crops.n_local)


@dataclass(frozen=True)
class LearnerContext:
    """What a hook may use of the learner (fixed for the run)."""

    model: SSLMetaArch  # student (possibly DDP/FSDP-wrapped parts), EMA teacher, losses
    device: torch.device
    rank: int
    world_size: int
    fsdp: bool  # the student's parts are FSDP2-sharded
    # count a skipped non-finite part of a step (the trainer's one counter and stop rule)
    record_nonfinite: Callable[[str], None]


@dataclass(frozen=True)
class StepContext:
    """One learner step, as a hook sees it."""

    step: int
    learner: LearnerContext
    schedule: dict[str, float]  # lr, weight_decay, momentum, teacher_temp, ... of this step

    @property
    def model(self) -> SSLMetaArch:
        return self.learner.model

    @property
    def device(self) -> torch.device:
        return self.learner.device


class StepHook:
    """Called around each learner step (see the module docstring). The base does nothing."""

    name = "hook"  # namespace of the hook's values in metrics.jsonl

    def setup(self, learner: LearnerContext) -> None:
        del learner

    def before_step(self, ctx: StepContext, images: Tensor, task: Task) -> Task:
        return task

    def after_step(self, ctx: StepContext, task: Task,
                   losses: dict[str, Tensor]) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
