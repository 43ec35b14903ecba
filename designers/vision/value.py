"""V of a designed DINO/iBOT task: the vision side's value closure for the meta core.

``V = ‖g_down‖ · d/dε L_pre(θ_S + ε·ĝ; designed task)`` with the teacher's targets a
constant of the pass (computed once; with a graph to the teacher's designed views under
``designer.teacher_gradient``). With ``value.method=fd`` the student runs split at the
aligned blocks (:meth:`SSLMetaArch.student_trunk` +
:func:`designers.value.directional_derivative_split`): the trunk once, only the aligned
blocks and heads at θ_S ± εv.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from designers.config import ValueConfig
from designers.value import (
    aligned_parameters,
    directional_derivative,
    directional_derivative_split,
    grad_only_for,
    unit_direction,
)
from dinov.models import Backbone
from dinov.train.task import Task

if TYPE_CHECKING:
    from dinov.train.meta_arch import SSLMetaArch, TeacherTargets


def backbone_aligned_parameters(backbone: nn.Module, n_last_blocks: int) -> list[nn.Parameter]:
    """The aligned set S of a ViT: its last ``n_last_blocks`` blocks and final norm."""
    backbone = getattr(backbone, "module", backbone)  # a DDP wrapper
    assert isinstance(backbone, Backbone)
    return aligned_parameters(backbone.model.blocks, n_last_blocks, [backbone.model.norm])


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


def designed_task_value(model: SSLMetaArch, designed: Task, teacher_temp: float,
                        aligned: list[nn.Parameter], direction: list[Tensor], cfg: ValueConfig,
                        teacher_gradient: bool) -> Tensor:
    """V = ‖direction‖·d/dε L_pre(θ_S + ε·d̂) ≈ directionᵀ∇θ_S L_pre (module docstring).

    Differentiable in the designer; the teacher targets are a no-grad constant unless
    ``teacher_gradient`` (then differentiable in the teacher's designed views).
    """
    # the teacher's weights are constants: targets once, before the perturbed passes
    targets = model.teacher_targets(designed, teacher_temp, differentiable=teacher_gradient)
    _, norm = unit_direction(direction)
    deriv = designed_loss_derivative(model, designed, targets, aligned, direction, cfg)
    return norm.to(deriv.dtype) * deriv
