"""The trainer's extension point: how a batch becomes a self-supervised task.

A :class:`TaskBuilder` turns a batch of images into a :class:`Task` (the student's
global and local views, the teacher's views and the iBOT masks). The default builds
DINO multicrop + iBOT block masks. A :class:`StepHook` is called around every learner
step; task designers use the pair to build designed views and to take their own meta
steps, without any change to the trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from dinov.config import Config
from dinov.data.masking import PatchMasks, sample_block_masks
from dinov.data.multicrop import MultiCropAugmentation

if TYPE_CHECKING:
    from dinov.train.trainer import Trainer


@dataclass
class Task:
    """One learner step's inputs. Global views are view-major: rows v*B:(v+1)*B are view v."""

    student_global: Tensor  # (n_global*B, 3, G, G)
    teacher_global: Tensor  # (n_global*B, 3, G, G); the same views unless a designer splits them
    local: Tensor  # (n_local*B, 3, L, L)
    masks: PatchMasks  # iBOT masks of the student's global views
    n_global: int
    n_local: int

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
        )

    def to(self, device: torch.device) -> Task:
        masks = PatchMasks(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self.masks)))
        return dataclasses.replace(
            self,
            student_global=self.student_global.to(device, non_blocking=True),
            teacher_global=self.teacher_global.to(device, non_blocking=True),
            local=self.local.to(device, non_blocking=True),
            masks=masks,
        )


class TaskBuilder(Protocol):
    def __call__(self, images: Tensor, step: int) -> Task: ...


class MultiCropTaskBuilder(nn.Module):
    """The default task: DINO multicrop on kornia plus iBOT block masks."""

    def __init__(self, cfg: Config, patch_grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.augment = MultiCropAugmentation(cfg.crops)
        self.patch_grid = patch_grid

    def forward(self, images: Tensor, step: int) -> Task:
        crops = self.augment(images)
        n_global_crops = crops.global_crops.shape[0]
        masks = sample_block_masks(n_global_crops, self.patch_grid, self.cfg.masks)
        masks = PatchMasks(*(t.to(images.device) for t in dataclasses.astuple(masks)))
        return Task(crops.global_crops, crops.global_crops, crops.local_crops, masks,
                    crops.n_global, crops.n_local)


class StepHook:
    """Called around each learner step. The base class does nothing."""

    def before_step(self, trainer: Trainer, step: int, images: Tensor, task: Task) -> Task:
        return task

    def after_step(self, trainer: Trainer, step: int, task: Task,
                   losses: dict[str, Tensor]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
