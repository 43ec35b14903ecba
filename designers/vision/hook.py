"""V-pretraining's meta step as a :class:`~dinov.train.task.StepHook` (DESIGN.md section 3).

:class:`DesignerHook` owns the designer network and its Adam optimizer, the feedback
pools and heads, and the calibration records. Around each learner step it

- before the step: builds the designed task from the trainer's default task; every
  ``designer.every`` steps after ``designer.burn_in`` it first takes a meta step:
  (1) fit the feedback heads on frozen student features, (2) ``g_down`` on a feedback
  meta batch (``feedback.mode=random`` swaps in a random direction of the same norm),
  (3) ``V = ‖g_down‖·∂_v L_pre(θ_S; designed views)`` and an Adam step of the designer
  on ``−V + R(φ)``. The returned task is the one V was evaluated on; the trainer
  detaches it, so nothing of the feedback reaches the learner except through the views.
- after the step: the one-step calibration, predicted ``ΔL_down = −lr·V`` against the
  realised change of ``L_down`` on the same meta batch, and its Pearson r.

``designer.kind=none`` returns the trainer's task unchanged and builds nothing, so the
baseline runs through this same code path and is bitwise the plain learner.
``designer.fixed=true`` (the fixed-designer control) applies the designer at its
initialisation to every task and never takes a meta step (no feedback data is loaded).

Cost: with ``value.method=fd`` the value runs split at the aligned blocks
(:meth:`SSLMetaArch.student_trunk` + :func:`directional_derivative_split`): the trunk
once, only the aligned blocks and heads at θ_S ± εv; ``value.batch_size`` evaluates V on
the first images of the batch only.

DDP: each rank evaluates V on its own images and the designer gradient is averaged;
head fitting, ``g_down`` and the calibration run the backbone on each rank's share of the
same feedback batches (:func:`designers.feedback.this_ranks_share`; head fitting gathers
the features, ``g_down`` and ``L_down`` are averaged), so heads and designer stay
identical on every rank. FSDP2: the same, with the student
unsharded for the meta step and the calibration
(:func:`dinov.distributed.full_parameters`: full θ on every rank, so fd perturbs and
restores whole tensors and FSDP does not re-gather shards in between); ``fd`` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from designers.config import ValueConfig, VConfig
from designers.feedback import (
    FeedbackBatch,
    FeedbackHeads,
    FeedbackPools,
    downstream_gradient_and_loss,
    downstream_loss,
)
from designers.masks import SoftMaskDesigner, TokenMaskDesigner
from designers.value import (
    aligned_parameters,
    directional_derivative,
    directional_derivative_split,
    grad_only_for,
    unit_direction,
)
from designers.views import AugmentationDesigner
from dinov.config import ConfigError
from dinov.distributed import (
    all_ranks_finite,
    average_gradients,
    full_parameters,
    is_distributed,
    uses_fsdp,
)
from dinov.train.task import StepHook, Task

if TYPE_CHECKING:
    from dinov.train.meta_arch import SSLMetaArch, TeacherTargets
    from dinov.train.trainer import Trainer


def pearson_r(x: list[float], y: list[float]) -> float:
    """Pearson correlation of two equal-length lists; nan below 3 points or with no spread."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def designed_loss_derivative(model: SSLMetaArch, designed: Task, targets: TeacherTargets,
                             aligned: list[nn.Parameter], direction: list[Tensor],
                             cfg: ValueConfig) -> Tensor:
    """d/dε L_pre(θ_S + ε·v; designed) along the unit ``direction`` v, by ``cfg.method``.

    The student loss on the designed task against fixed teacher ``targets``; with ``fd``
    split at the aligned blocks (the trunk once). The graph reaches the designer (and,
    for ``exact``, θ_S) only: every other learner parameter is frozen while it is built.
    """
    student = list(model.student.parameters())

    def graph_to_designer(fn: Callable[..., Any]) -> Callable[..., Any]:
        # inside each closure, so that recomputation in the backward (value.recompute)
        # sees the same requires_grad flags as the forward
        def run(*args: Any) -> Any:
            with grad_only_for(student, keep=aligned):
                return fn(*args)
        return run

    if cfg.method == "fd":
        trunk, head = model.student_trunk(designed, targets,
                                          model.num_blocks - cfg.align_last_n_blocks)
        return directional_derivative_split(graph_to_designer(trunk), graph_to_designer(head),
                                            aligned, direction, eps=cfg.eps,
                                            recompute=cfg.recompute)
    # around the call: jvp's functorch transform allows no flag changes inside it
    with grad_only_for(student, keep=aligned):
        return directional_derivative(lambda: model.student_losses(designed, targets)["total"],
                                      aligned, direction, method=cfg.method, eps=cfg.eps,
                                      module=model.student)


class DesignerHook(StepHook):
    """The designer, its meta steps and the calibration diagnostic (see the module docstring)."""

    def __init__(self, cfg: VConfig) -> None:
        self.cfg = cfg
        self.kind = cfg.designer.kind
        self.designer: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.pools: FeedbackPools | None = None
        self.heads: FeedbackHeads | None = None
        # meta batches have their own stream: the learner's RNG is not consumed by sampling
        self.meta_generator = torch.Generator().manual_seed(cfg.feedback.seed + 2)
        self.predicted: list[float] = []
        self.realised: list[float] = []
        self.last_v = math.nan
        self.meta_steps = 0
        self.last_head_losses: dict[str, float] = {}
        self._pending: tuple[FeedbackBatch, float, float] | None = None  # (meta batch, L_down, V)
        self._loaded: dict[str, Any] | None = None

    # ----- construction ----------------------------------------------------------------
    def _build_designer(self, trainer: Trainer) -> nn.Module:
        if self.kind == "mask":
            return SoftMaskDesigner()
        if self.kind == "token_mask":
            return TokenMaskDesigner(trainer.model.backbone.patch_size,
                                     temperature=self.cfg.designer.token_temperature)
        views = {"global": AugmentationDesigner(self.cfg.crops, view="global1")}
        if self.cfg.designer.augment_local:
            views["local"] = AugmentationDesigner(self.cfg.crops, view="local")
        return nn.ModuleDict(views)

    def setup(self, trainer: Trainer) -> None:
        """Build designer, optimizer, pools and heads once the learner exists.

        Under a forked, fixed-seed RNG: building them must not move the learner's random
        stream (the learner of a designed run then starts exactly like the baseline's).
        """
        if self.kind == "none" or self.designer is not None:
            return
        if uses_fsdp(trainer.cfg.dist) and self.cfg.value.method != "fd":
            # fd runs on the unsharded student (full_parameters); exact's double backward
            # and jvp's functional_call through FSDP's hooks are not supported
            raise NotImplementedError(
                f"value.method={self.cfg.value.method} with FSDP (dist.strategy="
                f"{trainer.cfg.dist.strategy}) is not supported; use value.method=fd")
        depth = trainer.model.num_blocks
        if self.cfg.value.align_last_n_blocks > depth:
            raise ConfigError(f"config key 'value.align_last_n_blocks' must be <= the backbone's "
                              f"depth ({depth}), got {self.cfg.value.align_last_n_blocks}")
        fb = self.cfg.feedback
        world = torch.distributed.get_world_size() if is_distributed() else 1
        if not self.cfg.designer.fixed and (fb.head_batch_size % world or fb.meta_batch_size % world):
            # checked here, not at the first meta step after a long burn-in: every rank
            # runs the backbone on an equal share of each feedback batch
            raise ValueError(
                f"feedback.head_batch_size ({fb.head_batch_size}) and feedback.meta_batch_size "
                f"({fb.meta_batch_size}) must be multiples of the world size ({world})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.feedback.seed)
            self.designer = self._build_designer(trainer).to(trainer.device)
            if not self.cfg.designer.fixed:  # the fixed control never reads feedback
                self.pools = FeedbackPools(self.cfg.feedback)
                self.heads = FeedbackHeads(trainer.model.backbone, self.cfg.feedback,
                                           self.pools.num_classes)
        self.optimizer = torch.optim.Adam(self.designer.parameters(), lr=self.cfg.designer.lr)
        if self._loaded is not None:
            self._apply_state(self._loaded)
            self._loaded = None

    # ----- designed views ----------------------------------------------------------------
    def design(self, images: Tensor, task: Task) -> tuple[Task, Tensor]:
        """The designed task (with graph to the designer) and the designer's regulariser."""
        assert self.designer is not None
        d = self.cfg.designer
        if isinstance(self.designer, SoftMaskDesigner):
            views, mu = self.designer(task.student_global)
            teacher = task.teacher_global
            reg = SoftMaskDesigner.regulariser(mu, d.kappa, d.lambda_sparsity, d.lambda_tv)
            if d.apply_to_teacher:
                teacher_views, teacher_mu = self.designer(task.teacher_global)
                teacher = teacher_views
                reg = reg + SoftMaskDesigner.regulariser(teacher_mu, d.kappa, d.lambda_sparsity,
                                                         d.lambda_tv)
            return dataclasses.replace(task, student_global=views, teacher_global=teacher), reg
        if isinstance(self.designer, TokenMaskDesigner):
            # which patches are masked is designed; how many per crop stays the default's
            counts = task.masks.masks.sum(1).float()
            masks, soft = self.designer(task.student_global, counts / task.masks.masks.shape[1])
            return dataclasses.replace(task, masks=masks, soft_masks=soft), soft.new_zeros(())
        # augmentation designers: every view drawn from the source images, view-major; the
        # local crops too unless designer.augment_local=false (then DINO's multicrop ones)
        assert isinstance(self.designer, nn.ModuleDict)
        source = images.to(task.student_global.device)
        crops = self.cfg.crops
        plan = [("global", crops.global_crops_size, task.n_global)]
        if "local" in self.designer and task.n_local > 0:
            plan.append(("local", crops.local_crops_size, task.n_local))
        views: dict[str, Tensor] = {}
        regs = []
        for kind, size, n_views in plan:
            designer = self.designer[kind]
            outs = [designer(source, size) for _ in range(n_views)]
            views[kind] = torch.cat([v for v, _ in outs])
            regs += [designer.regulariser(p, d.lambda_prior, d.lambda_entropy) for _, p in outs]
        return dataclasses.replace(task, student_global=views["global"], teacher_global=views["global"],
                                   local=views.get("local", task.local)), torch.stack(regs).mean()

    def is_meta_step(self, step: int) -> bool:
        d = self.cfg.designer
        if self.kind == "none" or d.fixed:
            return False
        return step >= d.burn_in and (step - d.burn_in) % d.every == 0

    def before_step(self, trainer: Trainer, step: int, images: Tensor, task: Task) -> Task:
        self._pending = None
        if self.kind == "none":
            return task
        self.setup(trainer)
        if step < self.cfg.designer.burn_in:
            return task
        if self.is_meta_step(step):
            # FSDP: the meta step calls the backbone's parts directly and perturbs θ_S in
            # place, on full parameters (identical on every rank)
            with full_parameters(trainer.model.student):
                return self.meta_step(trainer, step, images, task)
        with torch.no_grad():
            return self.design(images, task)[0]

    # ----- the meta step -------------------------------------------------------------------
    def meta_step(self, trainer: Trainer, step: int, images: Tensor, task: Task) -> Task:
        """Stages (1)-(3); returns the designed task V was evaluated on (graph attached)."""
        assert self.heads is not None and self.pools is not None
        cfg = self.cfg
        backbone = trainer.model.backbone
        self.last_head_losses = self.heads.fit(backbone, self.pools)  # (1) frozen features
        if not all(math.isfinite(v) for v in self.last_head_losses.values()):
            return self._skip(trainer, "feedback head loss", task)
        aligned = aligned_parameters(backbone, cfg.value.align_last_n_blocks)
        batch = self.pools.sample("meta", cfg.feedback.meta_batch_size, self.meta_generator)
        batch = batch.to(trainer.device)
        g_down, l_down_t = downstream_gradient_and_loss(backbone, self.heads, batch, aligned,
                                                        cfg.feedback)  # (2)
        if not all_ranks_finite(torch.stack([l_down_t.float(), *torch._foreach_norm(g_down)])):
            return self._skip(trainer, "feedback gradient g_down (or L_down)", task)
        l_down = float(l_down_t)
        # (3) V on the first value.batch_size images: only their views carry a graph
        n = self._value_rows(task)
        designed, reg = self.design(images[:n], task.rows(0, n))
        value = self.value(trainer, step, designed, aligned, g_down)
        if not all_ranks_finite(torch.stack([value.detach().float(), reg.detach().float()])):
            return self._skip(trainer, "value V (or the designer's regulariser)", task)
        if not self._designer_update(-value + reg):
            return self._skip(trainer, "designer gradient", task)
        if n < task.batch_size:
            with torch.no_grad():
                rest, _ = self.design(images[n:], task.rows(n, task.batch_size))
            designed = Task.concat(designed, rest)
        self.last_v = float(value.detach())
        self.meta_steps += 1
        self._pending = (batch, l_down, self.last_v)
        return designed

    def _skip(self, trainer: Trainer, part: str, task: Task) -> Task:
        """A non-finite meta step: no designer update, no calibration record, counted with
        the learner's skipped steps; the learner trains on the default task."""
        trainer.record_nonfinite(f"meta step: {part}")
        return task

    def _value_rows(self, task: Task) -> int:
        n = self.cfg.value.batch_size
        return task.batch_size if n == 0 else min(n, task.batch_size)

    def value(self, trainer: Trainer, step: int, designed: Task, aligned: list[nn.Parameter],
              g_down: list[Tensor]) -> Tensor:
        """V = ‖g_down‖·d/dε L_pre(θ_S + ε·ĝ) ≈ g_downᵀ∇θ_S L_pre.

        Differentiable in the designer; the teacher targets are a no-grad constant unless
        ``designer.teacher_gradient`` (then differentiable in the teacher's designed views).
        """
        model = trainer.model
        temp = trainer.schedules.at(step)["teacher_temp"]
        # the teacher's weights are constants: targets once, before the perturbed passes;
        # with designer.teacher_gradient they keep a graph to the designed teacher views
        targets = model.teacher_targets(designed, temp,
                                        differentiable=self.cfg.designer.teacher_gradient)
        _, norm = unit_direction(g_down)
        deriv = designed_loss_derivative(model, designed, targets, aligned, g_down, self.cfg.value)
        return norm.to(deriv.dtype) * deriv

    def _designer_update(self, loss: Tensor) -> bool:
        """One Adam step of the designer only; False (and no step) for a non-finite gradient.

        ``autograd.grad`` on the designer's parameters: the learner's ``.grad`` is never
        written (a plain ``backward`` would fill the student's non-aligned weights' grads).
        """
        assert self.designer is not None and self.optimizer is not None
        params = [p for p in self.designer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        # every rank evaluated V on its own images: one designer, the average gradient
        # (heads and g_down agree already: fitted and taken on shares of the same batches)
        average_gradients(params)
        finite = all_ranks_finite(torch.stack(torch._foreach_norm([p.grad for p in params])))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    # ----- calibration ---------------------------------------------------------------------
    def after_step(self, trainer: Trainer, step: int, task: Task,
                   losses: dict[str, Tensor]) -> dict[str, float]:
        if self.kind == "none" or self.cfg.designer.fixed:
            return {}
        if self._pending is not None:
            assert self.heads is not None
            batch, before, value = self._pending
            with full_parameters(trainer.model.student):
                after = float(downstream_loss(trainer.model.backbone, self.heads, batch,
                                              self.cfg.feedback))
            if math.isfinite(after):
                self.predicted.append(-trainer.schedules.at(step)["lr"] * value)
                self.realised.append(after - before)
            else:  # a diverged learner: a NaN pair would make every later r nan
                trainer.record_nonfinite("calibration: L_down after the learner step")
            self._pending = None
        return {"calibration_r": pearson_r(self.predicted, self.realised),
                "designer_V": self.last_v, "designer_meta_steps": float(self.meta_steps)}

    # ----- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.kind == "none":
            return {}
        if self.designer is None:  # not built yet (no step taken): carry a loaded state on
            return dict(self._loaded or {})
        assert self.optimizer is not None
        if self.heads is None:  # the fixed control: the (constant) designer only
            return {"designer": self.designer.state_dict()}
        return {
            "designer": self.designer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "heads": self.heads.state_dict(),
            "meta_generator": self.meta_generator.get_state(),
            "predicted": list(self.predicted),
            "realised": list(self.realised),
            "last_v": self.last_v,
            "meta_steps": self.meta_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.designer is None:
            self._loaded = state  # applied by setup(), once the learner's backbone exists
            return
        self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.designer is not None and self.optimizer is not None
        self.designer.load_state_dict(state["designer"])
        if self.heads is None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.heads.load_state_dict(state["heads"])
        self.meta_generator.set_state(state["meta_generator"])
        self.predicted = list(state["predicted"])
        self.realised = list(state["realised"])
        self.last_v = float(state["last_v"])
        self.meta_steps = int(state["meta_steps"])
