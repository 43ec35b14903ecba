"""The one place that owns student, EMA teacher, heads and the DINO/iBOT/KoLeo losses.

The step is split into parts a designer can call on its own: :meth:`teacher_targets`
(no grad, reads no mutable state besides the teacher's parameters), :meth:`student_losses`
(a pure function of the task and the targets, so it is the closure a value estimator
differentiates) and the two state updates, :meth:`update_centers` and
:meth:`update_teacher`, which only the learner step calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinov.config import Config
from dinov.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinov.models import Backbone, build_backbone, load_backbone_weights
from dinov.models.backbone import BackboneOutput, TokenState
from dinov.models.heads import build_head
from dinov.train.task import Task


@dataclass
class TeacherTargets:
    dino_logits: Tensor  # (n_global*B, K) before centering (for the softmax center update)
    dino_probs: Tensor  # (n_global, B, K)
    ibot_logits: Tensor  # (M, K_ibot)
    ibot_probs: Tensor  # (M, K_ibot)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone(cfg.model)
        if cfg.model.weights:
            load_backbone_weights(backbone, cfg.model.weights, cfg.model.weights_format,
                                  cfg.model.weights_key, cfg.model.pos_interp)
        student = nn.ModuleDict({
            "backbone": backbone,
            "dino_head": build_head(cfg.head, backbone.embed_dim),
        })
        if cfg.head.ibot_separate_head:
            student["ibot_head"] = build_head(cfg.head, backbone.embed_dim, cfg.head.ibot_out_dim)
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        ibot_dim = cfg.head.ibot_out_dim if cfg.head.ibot_separate_head else cfg.head.out_dim
        self.dino_loss = DINOLoss(cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
        self.ibot_loss = IBOTPatchLoss(ibot_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
        self.koleo_loss = KoLeoLoss()

    @property
    def backbone(self) -> Backbone:
        module = self.student["backbone"]
        return getattr(module, "module", module)  # unwrap DDP

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def _heads(self, modules: nn.ModuleDict, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """DINO logits of the CLS tokens and iBOT logits of the masked patch tokens (fp32).

        With a shared head (DINOv2's default) both go through one call, so the prototype
        matrix is normalised and multiplied once per step instead of twice.
        """
        if "ibot_head" in modules:
            return modules["dino_head"](cls_tokens).float(), modules["ibot_head"](patch_tokens).float()
        logits = modules["dino_head"](torch.cat([cls_tokens, patch_tokens])).float()
        return logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0]:]

    def teacher_targets(self, task: Task, teacher_temp: float,
                        differentiable: bool = False) -> TeacherTargets:
        """The teacher's targets for ``task``; no graph unless ``differentiable``, which keeps
        one to the task's teacher views (a designer's gradient through them). The teacher's
        weights are never differentiated, and nothing here updates state."""
        with torch.set_grad_enabled(differentiable):
            return self._teacher_targets(task, teacher_temp)

    def _teacher_targets(self, task: Task, teacher_temp: float) -> TeacherTargets:
        loss_cfg = self.cfg.loss
        with autocast_context(self.cfg.train.precision, task.teacher_global.device):
            out = self.teacher["backbone"](task.teacher_global)
            patches = out.patch.flatten(0, 1)[task.masks.indices]
            dino_logits, ibot_logits = self._heads(self.teacher, out.cls, patches)
        dino_probs = self.dino_loss.teacher_probs(
            dino_logits, teacher_temp, loss_cfg.centering, loss_cfg.sinkhorn_iterations)
        if ibot_logits.shape[0] > 0:
            ibot_probs = self.ibot_loss.teacher_probs(
                ibot_logits, teacher_temp, loss_cfg.centering,
                n_iterations=loss_cfg.sinkhorn_iterations)
        else:
            ibot_probs = ibot_logits
        return TeacherTargets(dino_logits, dino_probs.unflatten(0, (task.n_global, -1)),
                              ibot_logits, ibot_probs)

    def student_losses(self, task: Task, targets: TeacherTargets) -> dict[str, Tensor]:
        """DINO, iBOT and KoLeo losses and their weighted ``total``; reads no mutable state."""
        student = self.student
        with autocast_context(self.cfg.train.precision, task.student_global.device):
            global_out = student["backbone"](task.student_global, task.student_masks())
            local_cls = student["backbone"](task.local).cls if task.n_local > 0 else None
            logits = self._student_logits(global_out, local_cls, task)
        return self._losses(*logits, global_out.cls, task, targets)

    def student_trunk(self, task: Task, targets: TeacherTargets, end: int
                      ) -> tuple[Callable[[], tuple[Tensor, ...]], Callable[..., Tensor]]:
        """:meth:`student_losses` ``["total"]`` cut after block ``end - 1``, as two closures.

        ``trunk()`` returns the global (masked) and local crops' tokens after blocks
        ``[0, end)``, then the loss's other inputs that may carry a graph to a designer:
        the iBOT patch weights (soft token masks) and the teacher's DINO and iBOT
        probabilities (``designer.teacher_gradient``). ``head(*trunk())`` runs the
        remaining blocks, the final norm, the heads and the losses, and reads no other
        tensor with a graph, so a value estimator can differentiate it w.r.t. its
        arguments alone. It is the same function as the total of :meth:`student_losses`,
        on the unwrapped backbone (no DDP hooks) and in fp32 (a value estimator
        differences two nearby passes; bf16 rounding would swamp them).
        """
        backbone = self.backbone
        shells: dict[str, TokenState] = {}  # grid and RoPE table of each crop size

        def run(name: str, state: TokenState) -> Tensor:
            shells[name] = dataclasses.replace(state, x=state.x.new_empty(0))
            return backbone.run_blocks(state, 0, end).x

        def trunk() -> tuple[Tensor, ...]:
            tokens = [run("global", backbone.prepare_tokens(task.student_global, task.student_masks()))]
            if task.n_local > 0:
                tokens.append(run("local", backbone.prepare_tokens(task.local)))
            return (*tokens, task.ibot_weights(), targets.dino_probs, targets.ibot_probs)

        def rest(state: TokenState, x: Tensor) -> BackboneOutput:
            return backbone.finalize(backbone.run_blocks(dataclasses.replace(state, x=x), end))

        def head(*inputs: Tensor) -> Tensor:
            *tokens, ibot_weights, dino_probs, ibot_probs = inputs
            global_out = rest(shells["global"], tokens[0])
            local_cls = rest(shells["local"], tokens[1]).cls if task.n_local > 0 else None
            logits = self._student_logits(global_out, local_cls, task)
            # the losses read the probabilities only; the logits (for the centre update)
            # come without their graph, so no gradient can leave the head but by its arguments
            probs = TeacherTargets(targets.dino_logits.detach(), dino_probs,
                                   targets.ibot_logits.detach(), ibot_probs)
            return self._losses(*logits, global_out.cls, task, probs, ibot_weights)["total"]

        return trunk, head

    def _student_logits(self, global_out: BackboneOutput, local_cls: Tensor | None,
                        task: Task) -> tuple[Tensor, Tensor]:
        cls_tokens = [global_out.cls] if local_cls is None else [global_out.cls, local_cls]
        masked = global_out.patch.flatten(0, 1)[task.masks.indices]
        return self._heads(self.student, torch.cat(cls_tokens), masked)

    def _losses(self, dino_logits: Tensor, ibot_logits: Tensor, global_cls: Tensor, task: Task,
                targets: TeacherTargets, ibot_weights: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted losses; ``ibot_weights`` defaults to ``task.ibot_weights()``."""
        loss_cfg = self.cfg.loss
        n_crops = task.n_global + task.n_local
        dino = self.dino_loss(dino_logits.unflatten(0, (n_crops, -1)), targets.dino_probs,
                              n_global=task.n_global)
        if ibot_logits.shape[0] > 0:
            weights = task.ibot_weights() if ibot_weights is None else ibot_weights
            ibot = self.ibot_loss(ibot_logits, targets.ibot_probs, weights)
        else:
            ibot = dino_logits.new_zeros(())
        koleo = sum(self.koleo_loss(c.float()) for c in global_cls.chunk(task.n_global))
        total = (loss_cfg.dino_loss_weight * dino + loss_cfg.ibot_loss_weight * ibot
                 + loss_cfg.koleo_loss_weight * koleo)
        return {"total": total, "dino": dino, "ibot": ibot, "koleo": koleo}

    def forward(self, task: Task, teacher_temp: float) -> tuple[dict[str, Tensor], TeacherTargets]:
        targets = self.teacher_targets(task, teacher_temp)
        return self.student_losses(task, targets), targets

    @torch.no_grad()
    def update_centers(self, targets: TeacherTargets) -> None:
        if self.cfg.loss.centering == "softmax":
            self.dino_loss.update_center(targets.dino_logits)
            if targets.ibot_logits.shape[0] > 0:
                self.ibot_loss.update_center(targets.ibot_logits)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, on local shards."""
        teacher_params, student_params = [], []
        for name, student_module in self.student.items():
            student_module = getattr(student_module, "module", student_module)
            teacher_module = self.teacher[name]
            teacher_params += list(teacher_module.parameters())
            student_params += list(student_module.parameters())
        torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)
