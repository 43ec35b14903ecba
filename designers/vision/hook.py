"""The DINO step hook of vision V-pretraining: designed views, meta steps, calibration.

:class:`VisionDesignerHook` owns the designer (built from the registry by
``designer.kind``), the feedback pools and heads, and a :class:`~designers.meta.MetaCore`
that it drives. Around each learner step it

- before the step: returns the designed task (the learner's default task through the
  designer); every ``designer.every`` steps after ``designer.burn_in`` it first takes a
  meta step through the core: (1) fit the feedback heads on frozen student features,
  (2) ``g_down`` on a feedback meta batch, (3) ``V`` of the designed task on the first
  ``value.batch_size`` images, and the designer's step on ``−V + R``. The returned task
  is the one V was evaluated on; the trainer detaches it, so nothing of the feedback
  reaches the learner except through the views;
- after the step: the one-step calibration (``L_down`` of the same meta batch again),
  and this step's row of ``designer/*`` values for ``metrics.jsonl``.

``designer.kind=none`` returns the trainer's task unchanged and builds nothing, so the
baseline runs through this same code path and is bitwise the plain learner.
``designer.fixed=true`` (the fixed-designer control) applies the designer at its
initialisation to every task and never takes a meta step (no feedback data is loaded).

DDP: each rank evaluates V on its own images and the core averages the designer
gradient; head fitting, ``g_down`` and the calibration run the backbone on each rank's
share of the same feedback batches (:func:`designers.vision.feedback.this_ranks_share`;
head fitting gathers the features, ``g_down`` and ``L_down`` are averaged), so heads and
designer stay identical on every rank. FSDP2: the same, with the student unsharded for
the meta step and the calibration (:func:`dinov.distributed.full_parameters`: full θ on
every rank, so fd perturbs and restores whole tensors); ``fd`` only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from designers.meta import Feedback, MetaCore, NonFiniteMetaStep
from designers.registry import build_designer
from designers.vision import VISION
from designers.vision.config import VConfig
from designers.vision.feedback import (
    FeedbackHeads,
    FeedbackPools,
    downstream_gradient_and_loss,
    downstream_loss,
)
from designers.vision.value import backbone_aligned_parameters, designed_task_value
from dinov.config import ConfigError
from dinov.distributed import full_parameters
from dinov.train.task import LearnerContext, StepContext, StepHook, Task


class VisionDesignerHook(StepHook):
    """The designer, its meta steps and the calibration diagnostic (module docstring)."""

    name = "designer"

    def __init__(self, cfg: VConfig) -> None:
        self.cfg = cfg
        self.kind = cfg.designer.kind
        self.core: MetaCore | None = None
        self.pools: FeedbackPools | None = None
        self.heads: FeedbackHeads | None = None
        # meta batches have their own stream: the learner's RNG is not consumed by sampling
        self.meta_generator = torch.Generator().manual_seed(cfg.feedback.seed + 2)
        self._row: dict[str, float] | None = None  # this step's meta-step values

    @property
    def designer(self) -> nn.Module | None:
        return None if self.core is None else self.core.designer

    # ----- construction ----------------------------------------------------------------
    def setup(self, learner: LearnerContext) -> None:
        """Build designer, core, pools and heads (before any resume loads their state).

        Under a forked, fixed-seed RNG: building them must not move the learner's random
        stream (the learner of a designed run then starts exactly like the baseline's).
        """
        if self.kind == "none":
            return
        self._check(learner)
        d, fb = self.cfg.designer, self.cfg.feedback
        backbone = learner.model.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fb.seed)
            designer = build_designer(self.kind, VISION, getattr(d, self.kind, None),
                                      patch_size=backbone.patch_size, crops=self.cfg.crops)
            designer = designer.to(learner.device)
            if not d.fixed:  # the fixed control never reads feedback
                self.pools = FeedbackPools(fb)
                self.heads = FeedbackHeads(backbone, fb, self.pools.num_classes)
        self.core = MetaCore(designer, every=d.every, burn_in=d.burn_in, lr=d.lr, fixed=d.fixed,
                             feedback_mode=fb.mode, seed=fb.seed + 1)

    def _check(self, learner: LearnerContext) -> None:
        """What can only be checked against the learner, before the first step."""
        cfg = self.cfg
        depth = learner.model.num_blocks
        if cfg.value.align_last_n_blocks > depth:
            raise ConfigError(f"config key 'value.align_last_n_blocks' must be <= the backbone's "
                              f"depth ({depth}), got {cfg.value.align_last_n_blocks}")
        if learner.fsdp and cfg.value.method != "fd":
            # fd runs on the unsharded student (full_parameters); exact's double backward
            # and jvp's functional_call through FSDP's hooks are not supported
            raise NotImplementedError(
                f"value.method={cfg.value.method} with FSDP is not supported; use value.method=fd")
        fb, world = cfg.feedback, learner.world_size
        if not cfg.designer.fixed and (fb.head_batch_size % world or fb.meta_batch_size % world):
            # every rank runs the backbone on an equal share of each feedback batch
            raise ValueError(
                f"feedback.head_batch_size ({fb.head_batch_size}) and feedback.meta_batch_size "
                f"({fb.meta_batch_size}) must be multiples of the world size ({world})")

    # ----- the step ----------------------------------------------------------------------
    def before_step(self, ctx: StepContext, images: Tensor, task: Task) -> Task:
        if self.core is None or ctx.step < self.cfg.designer.burn_in:
            return task
        self.core.calibration.pending = None  # a skipped learner step leaves none to close
        if self.core.is_meta_step(ctx.step):
            # FSDP: the meta step calls the backbone's parts directly and perturbs θ_S in
            # place, on full parameters (identical on every rank)
            with full_parameters(ctx.model.student):
                return self.meta_step(ctx, images, task)
        with torch.no_grad():
            return self.core.designer.design(images, task).task

    def meta_step(self, ctx: StepContext, images: Tensor, task: Task) -> Task:
        """Stages (1)-(3) through the core; returns the designed task V was evaluated on
        (graph attached), or the default task when a stage was not finite."""
        assert self.core is not None
        aligned = backbone_aligned_parameters(ctx.model.backbone, self.cfg.value.align_last_n_blocks)
        n = self._value_rows(task)
        designed: list[Task] = []

        def value(direction: list[Tensor]) -> tuple[Tensor, Tensor]:
            # (3) V on the first value.batch_size images: only their views carry a graph
            assert self.core is not None
            design = self.core.designer.design(images[:n], task.rows(0, n))
            designed.append(design.task)
            v = designed_task_value(ctx.model, design.task, ctx.schedule["teacher_temp"],
                                    aligned, direction, self.cfg.value,
                                    self.cfg.designer.teacher_gradient)
            return v, self.core.designer.regulariser(design)

        self._row = self.core.meta_step(lambda: self._feedback(ctx, aligned), value,
                                        ctx.learner.record_nonfinite)
        if self._row is None:
            return task
        first = designed[0]
        if n == task.batch_size:
            return first
        with torch.no_grad():
            rest = self.core.designer.design(images[n:], task.rows(n, task.batch_size)).task
        return Task.concat(first, rest)

    def _feedback(self, ctx: StepContext, aligned: list[nn.Parameter]) -> Feedback:
        """(1) fit the heads on frozen features, (2) g_down and L_down on a meta batch."""
        assert self.heads is not None and self.pools is not None
        backbone = ctx.model.backbone
        head_losses = self.heads.fit(backbone, self.pools)
        if not all(math.isfinite(v) for v in head_losses.values()):
            raise NonFiniteMetaStep("feedback head loss")
        batch = self.pools.sample("meta", self.cfg.feedback.meta_batch_size, self.meta_generator)
        batch = batch.to(ctx.device)
        g_down, l_down = downstream_gradient_and_loss(backbone, self.heads, batch, aligned,
                                                      self.cfg.feedback)
        return Feedback(g_down, l_down, batch, {f"head_loss_{k}": v for k, v in head_losses.items()})

    def _value_rows(self, task: Task) -> int:
        n = self.cfg.value.batch_size
        return task.batch_size if n == 0 else min(n, task.batch_size)

    # ----- calibration and the row ---------------------------------------------------------
    def after_step(self, ctx: StepContext, task: Task,
                   losses: dict[str, Tensor]) -> dict[str, float]:
        """This step's ``designer/*`` row: a meta step's V, L_down, g_down norm, head
        losses, regulariser and calibration pair (nothing on other steps)."""
        if self.core is None or self.core.calibration.pending is None:
            return {}
        assert self.heads is not None
        batch = self.core.calibration.pending[2]
        with full_parameters(ctx.model.student):
            after = float(downstream_loss(ctx.model.backbone, self.heads, batch, self.cfg.feedback))
        row = dict(self._row or {})
        row.update(self.core.realise(ctx.schedule["lr"], after, ctx.learner.record_nonfinite))
        return row

    def summary(self) -> dict[str, Any]:
        return {} if self.core is None else self.core.summary()

    # ----- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.core is None:
            return {}
        state: dict[str, Any] = {"core": self.core.state_dict()}
        if self.heads is not None:
            state["heads"] = self.heads.state_dict()
            state["meta_generator"] = self.meta_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.core is None:
            return
        self.core.load_state_dict(state["core"])
        if self.heads is not None:
            self.heads.load_state_dict(state["heads"])
            self.meta_generator.set_state(state["meta_generator"])
