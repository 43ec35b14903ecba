"""Typed configuration of a V-pretraining run: the learner's :class:`~dinov.config.Config`
plus the designer, the value estimator and the feedback (DESIGN.md section 3).

Choice-valued keys are listed in :data:`V_CHOICES`; pass it as ``choices=`` to
:func:`dinov.config.load_config` / :func:`dinov.cli.parse_config` so that a wrong value
is a :class:`~dinov.config.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from designers.feedback import MODES, SOURCES, FeedbackConfig
from designers.value import METHODS
from dinov.config import Config, check_range

DESIGNER_KINDS = ("none", "mask", "augment", "token_mask")


@dataclass
class DesignerConfig:
    """The task designer and its meta steps.

    ``kind``: ``none`` (the baseline: default multicrop, through the same hook),
    ``mask`` (soft-mask U-Net on the student's global views), ``augment``
    (per-instance reparameterised augmentation of the global views) or ``token_mask``
    (which patches iBOT masks, at the default task's per-crop mask counts). A meta step
    runs at steps ``burn_in, burn_in + every, ...``; before ``burn_in`` the learner sees
    the default views. ``fixed`` is the fixed-designer control: the designer at its
    initialisation shapes every task and is never updated (no meta step, no feedback
    data loaded). ``apply_to_teacher`` also feeds the designed views to the teacher
    (mask designer; default: student views only). The ``lambda_*``/``kappa`` weights are
    the regularisers' (sparsity/TV for masks, prior/entropy for augmentations);
    ``token_temperature`` is the token-mask designer's relaxation temperature.
    ``augment_local``: the augmentation designer also designs the local crops (a second
    designer with DINO's local-crop ranges); false keeps DINO's multicrop local crops.
    ``teacher_gradient``: V's designer gradient also flows through the teacher's views
    (their targets computed with a graph; teacher weights stay constant). It matters where
    the teacher sees designed views: the augmentation designer, or the mask designer
    with ``apply_to_teacher``; the token-mask designer only chooses discrete patch indices
    of the teacher's targets, which carry no gradient.
    """

    kind: str = "none"
    every: int = 4
    burn_in: int = 0
    lr: float = 3e-4
    kappa: float = 0.5
    lambda_sparsity: float = 0.2
    lambda_tv: float = 0.08
    lambda_prior: float = 1.0
    lambda_entropy: float = 0.01
    apply_to_teacher: bool = False
    fixed: bool = False
    token_temperature: float = 0.5
    augment_local: bool = True
    teacher_gradient: bool = False

    def __post_init__(self) -> None:
        check_range("designer.every", self.every, 1)
        check_range("designer.burn_in", self.burn_in, 0)
        check_range("designer.lr", self.lr, 0.0, low_open=True)
        check_range("designer.kappa", self.kappa, 0.0, 1.0)
        for key in ("lambda_sparsity", "lambda_tv", "lambda_prior", "lambda_entropy"):
            check_range(f"designer.{key}", getattr(self, key), 0.0)
        check_range("designer.token_temperature", self.token_temperature, 0.0, low_open=True)


@dataclass
class ValueConfig:
    """The value estimator.

    ``method`` of the directional derivative (fd|jvp|exact); the aligned set S (last
    ``align_last_n_blocks`` blocks + final norm); the fd step ``eps`` (relative to ‖θ_S‖).
    ``batch_size``: V is evaluated on the first ``batch_size`` images of the learner's
    batch (the unlabelled meta batch; 0 = the whole batch); the learner still trains on
    the designed views of every image. Per rank: under DDP each rank evaluates V on its
    own images and the designer gradient is averaged, so the meta batch is world size ×
    ``batch_size`` (``feedback.meta_batch_size`` and ``head_batch_size`` are global).
    ``recompute`` (fd only): rebuild the trunk's graph in the backward instead of keeping
    it (less memory, one more trunk forward; see
    :func:`designers.value.directional_derivative_split`).
    """

    method: str = "fd"
    align_last_n_blocks: int = 2
    eps: float = 1e-3
    batch_size: int = 0
    recompute: bool = False

    def __post_init__(self) -> None:
        check_range("value.batch_size", self.batch_size, 0)
        # the upper bound is the backbone's depth: checked when the designer is set up
        check_range("value.align_last_n_blocks", self.align_last_n_blocks, 1)
        check_range("value.eps", self.eps, 0.0, low_open=True)  # fd divides by it


@dataclass
class VConfig(Config):
    """A complete V-pretraining run: learner + designer + value + feedback.

    Beyond the learner's, the designer's kind and modules and the feedback heads' shapes
    are architecture: a resume cannot change them.
    """

    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        *Config.ARCHITECTURE_KEYS, "designer.kind", "designer.fixed", "designer.augment_local",
        "feedback.source", "feedback.seg_num_classes", "feedback.depth_head_mode",
        "feedback.depth_n_bins", "feedback.depth_layers", "feedback.depth_layer_set",
    )

    designer: DesignerConfig = field(default_factory=DesignerConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


# merged with dinov.config's own choices by load_config
V_CHOICES: dict[str, tuple[str, ...]] = {
    "designer.kind": DESIGNER_KINDS,
    "value.method": METHODS,
    "feedback.mode": MODES,
    "feedback.source": SOURCES,
}
