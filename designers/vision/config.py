"""Typed configuration of a vision V-pretraining run (``python -m designers.train``): the
learner's :class:`~dinov.config.Config` plus the designer with one section per
designer (``designer.mask.*``, ``designer.augment.*``, ``designer.token_mask.*``), the
value estimator and the feedback (DESIGN.md section 3).

A designer registered outside this package (:func:`designers.registry.register_designer`
with ``modality="vision"`` and a config dataclass) gets its section too:
:func:`vconfig_schema` adds it, and :func:`load_vconfig` loads with that schema.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from designers.config import DesignerConfig, ValueConfig
from designers.registry import registered_designers
from dinov.config import Config, ConfigError, check_choice, check_range, load_config
from eval.heads import HEAD_MODES, LAYER_SETS, LOSSES

FEEDBACK_SOURCES = ("synthetic", "real")
FEEDBACK_MODES = ("real", "random")


@dataclass
class MaskDesignerConfig:
    """The soft-mask designer (``designer.kind=mask``): its regulariser
    ``λ_sparsity·(mean μ − κ)² + λ_tv·TV(μ)``; ``apply_to_teacher`` also feeds the designed
    views to the teacher (default: the student's views only)."""

    kappa: float = 0.5
    lambda_sparsity: float = 0.2
    lambda_tv: float = 0.08
    apply_to_teacher: bool = False

    def __post_init__(self) -> None:
        check_range("designer.mask.kappa", self.kappa, 0.0, 1.0)
        check_range("designer.mask.lambda_sparsity", self.lambda_sparsity, 0.0)
        check_range("designer.mask.lambda_tv", self.lambda_tv, 0.0)


@dataclass
class AugmentDesignerConfig:
    """The augmentation designer (``designer.kind=augment``): its regulariser weights (pull
    toward DINO's default augmentation, reward of the draws' entropy); ``local``: also
    design the local crops (a second designer with DINO's local-crop ranges; false keeps
    DINO's multicrop local crops)."""

    lambda_prior: float = 1.0
    lambda_entropy: float = 0.01
    local: bool = True

    def __post_init__(self) -> None:
        check_range("designer.augment.lambda_prior", self.lambda_prior, 0.0)
        check_range("designer.augment.lambda_entropy", self.lambda_entropy, 0.0)


@dataclass
class TokenMaskDesignerConfig:
    """The iBOT token-mask designer (``designer.kind=token_mask``): which patches are
    masked, at the default task's per-crop counts; ``temperature`` of its relaxation."""

    temperature: float = 0.5

    def __post_init__(self) -> None:
        check_range("designer.token_mask.temperature", self.temperature, 0.0, low_open=True)


@dataclass
class VisionDesignerConfig(DesignerConfig):
    """:class:`~designers.config.DesignerConfig` plus the vision designers' sections.

    ``teacher_gradient``: V's designer gradient also flows through the teacher's views
    (their targets computed with a graph; teacher weights stay constant). It matters where
    the teacher sees designed views: the augmentation designer, or the mask designer
    with ``mask.apply_to_teacher``; the token-mask designer only chooses discrete patch
    indices of the teacher's targets, which carry no gradient.
    """

    teacher_gradient: bool = False
    mask: MaskDesignerConfig = field(default_factory=MaskDesignerConfig)
    augment: AugmentDesignerConfig = field(default_factory=AugmentDesignerConfig)
    token_mask: TokenMaskDesignerConfig = field(default_factory=TokenMaskDesignerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        from designers.vision import VISION  # the built-in designers register on import

        check_choice("designer.kind", self.kind, ("none", *registered_designers(VISION)))


@dataclass
class FeedbackConfig:
    """Feedback pools, heads and g_down settings.

    Pool sizes default to DESIGN.md's published ones (ADE20K 2,000 head + 512 meta,
    NYUv2 512 + 128) for ``source="real"``; ``synthetic_*`` apply to ``source="synthetic"``,
    where every scene carries both labels. ``seg_num_classes=None`` means the source's
    class count (10 synthetic classes, 150 for ADE20K). ``mode="random"`` is the
    random-feedback control (:mod:`designers.meta`).
    """

    source: str = "synthetic"
    ade20k_root: str | None = None
    nyu_split_file: str | None = None
    nyu_root: str | None = None  # default: the split file's folder
    seg_head_pool: int = 2000
    seg_meta_pool: int = 512
    depth_head_pool: int = 512
    depth_meta_pool: int = 128
    synthetic_head_pool: int = 256
    synthetic_meta_pool: int = 64
    image_size: int = 224
    alpha_seg: float = 1.0
    alpha_depth: float = 1.0
    seg_num_classes: int | None = None
    depth_loss: str = "sigloss"
    depth_head_mode: str = "bins"
    depth_n_bins: int = 256
    depth_layers: int = 1  # blocks feeding the depth head (with their CLS tokens)
    depth_layer_set: str = "last"
    min_depth: float = 1e-3
    max_depth: float = 10.0
    head_lr: float = 1e-3
    head_weight_decay: float = 0.0
    head_steps: int = 10  # head-fitting steps per meta step
    head_warmup_steps: int = 0  # steps of the first fit (fresh heads); 0: head_steps
    head_batch_size: int = 32
    meta_batch_size: int = 32
    seed: int = 0
    mode: str = "real"

    def __post_init__(self) -> None:
        check_choice("feedback.source", self.source, FEEDBACK_SOURCES)
        check_choice("feedback.mode", self.mode, FEEDBACK_MODES)
        check_choice("feedback.depth_loss", self.depth_loss, LOSSES)
        check_choice("feedback.depth_head_mode", self.depth_head_mode, HEAD_MODES)
        check_choice("feedback.depth_layer_set", self.depth_layer_set, LAYER_SETS)
        if self.alpha_seg < 0 or self.alpha_depth < 0 or self.alpha_seg + self.alpha_depth == 0:
            raise ConfigError("config keys 'feedback.alpha_seg' and 'feedback.alpha_depth' must "
                              "be >= 0 and not both 0")
        check_range("feedback.head_steps", self.head_steps, 1)
        check_range("feedback.head_warmup_steps", self.head_warmup_steps, 0)
        for key in ("seg_head_pool", "seg_meta_pool", "depth_head_pool", "depth_meta_pool",
                    "synthetic_head_pool", "synthetic_meta_pool", "image_size",
                    "depth_n_bins", "depth_layers", "head_batch_size", "meta_batch_size"):
            check_range(f"feedback.{key}", getattr(self, key), 1)
        if self.seg_num_classes is not None:
            check_range("feedback.seg_num_classes", self.seg_num_classes, 1)
        check_range("feedback.min_depth", self.min_depth, 0.0, low_open=True)
        check_range("feedback.max_depth", self.max_depth, self.min_depth, low_open=True)
        check_range("feedback.head_lr", self.head_lr, 0.0, low_open=True)
        check_range("feedback.head_weight_decay", self.head_weight_decay, 0.0)


@dataclass
class VConfig(Config):
    """A complete V-pretraining run: learner + designer + value + feedback.

    Beyond the learner's, the designer's kind and modules and the feedback heads' shapes
    are architecture: a resume cannot change them.
    """

    TRAINER: ClassVar[str] = "designers.train"
    INPUT_PATH_KEYS: ClassVar[tuple[str, ...]] = (
        *Config.INPUT_PATH_KEYS, "feedback.ade20k_root", "feedback.nyu_split_file", "feedback.nyu_root")
    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        *Config.ARCHITECTURE_KEYS, "designer.kind", "designer.fixed", "designer.augment.local",
        "feedback.source", "feedback.seg_num_classes", "feedback.depth_head_mode",
        "feedback.depth_n_bins", "feedback.depth_layers", "feedback.depth_layer_set",
    )
    # the flat designer keys of earlier versions, and where they live now
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "designer.kappa": "designer.mask.kappa",
        "designer.lambda_sparsity": "designer.mask.lambda_sparsity",
        "designer.lambda_tv": "designer.mask.lambda_tv",
        "designer.apply_to_teacher": "designer.mask.apply_to_teacher",
        "designer.lambda_prior": "designer.augment.lambda_prior",
        "designer.lambda_entropy": "designer.augment.lambda_entropy",
        "designer.augment_local": "designer.augment.local",
        "designer.token_temperature": "designer.token_mask.temperature",
    }

    designer: VisionDesignerConfig = field(default_factory=VisionDesignerConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


def vconfig_schema() -> type[VConfig]:
    """:class:`VConfig`, with a ``designer.<name>`` section for every vision designer
    registered with a config beyond the built-in ones."""
    from designers.vision import VISION

    known = {f.name for f in dataclasses.fields(VisionDesignerConfig)}
    extra = [(name, spec.config, field(default_factory=spec.config))
             for name, spec in registered_designers(VISION).items()
             if spec.config is not None and name not in known]
    if not extra:
        return VConfig
    designer = dataclasses.make_dataclass("VisionDesignerConfig", extra,
                                          bases=(VisionDesignerConfig,))
    return dataclasses.make_dataclass(
        "VConfig", [("designer", designer, field(default_factory=designer))], bases=(VConfig,))


def load_vconfig(path: str | pathlib.Path | None, overrides: list[str] | None = None) -> Any:
    """:func:`dinov.config.load_config` with :func:`vconfig_schema`."""
    return load_config(path, overrides, schema=vconfig_schema())
