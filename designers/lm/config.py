"""Typed configuration of a language-model run (``python -m designers.lm.train``).

Schema defaults <- YAML <- ``key=value``, as for the vision trainer
(:func:`dinov.config.load_config`): unknown keys, wrong types and out-of-range values are
errors naming the key. The published Qwen settings are in ``configs/lm/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dinov.config import (
    PREEMPT_SIGNALS,
    CheckpointConfig,
    DistributedConfig,
    LogConfig,
    check_choice,
    check_preemption,
    check_range,
)
from eval.lm import LMModelConfig

OVERLONG = ("split", "drop")
PRECISIONS = ("fp32", "bf16")


@dataclass
class LMDataConfig:
    """The pretraining corpus and how it becomes packed sequences.

    ``path``: NuminaMath-CoT style JSONL or parquet (``problem``/``solution`` columns, or
    ``messages``). Each document is ``prompt_template`` + ``answer_template`` (published:
    ``Question: {problem}\\nAnswer: {solution}``) and EOS; the loss is on the answer tokens
    only. Documents are drawn through a shuffle buffer of ``shuffle_buffer`` documents and
    packed whole into sequences of ``seq_len`` tokens (:mod:`designers.lm.data`); a
    document longer than ``seq_len`` is ``split`` into pieces or ``drop``-ped, and counted.
    """

    path: str | None = None
    prompt_template: str = "Question: {problem}\nAnswer: "
    answer_template: str = "{solution}"
    seq_len: int = 1024
    shuffle_buffer: int = 10000
    overlong: str = "split"
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("data.seq_len", self.seq_len, 2)
        check_range("data.shuffle_buffer", self.shuffle_buffer, 1)
        check_choice("data.overlong", self.overlong, OVERLONG)


@dataclass
class LMFeedbackConfig:
    """The GSM8K feedback pool (used by the designer): ``pool_size`` examples of the train
    split ``train``, drawn with ``seed`` (published: 1,024)."""

    train: str | None = None
    pool_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("feedback.pool_size", self.pool_size, 1)


@dataclass
class LMOptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio``·lr; clipping at
    ``clip_grad`` (0: none). Weight decay applies to matrices, not to biases and norms."""

    lr: float = 2e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, 0.0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)
        check_range("optim.eps", self.eps, 0.0, low_open=True)
        check_range("optim.clip_grad", self.clip_grad, 0.0)


@dataclass
class LMTrainConfig:
    """The loop: ``steps`` optimizer steps of ``micro_batch_size`` sequences per process
    times ``grad_accum`` micro-batches (global batch: that times the world size)."""

    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 2
    resume: bool = False
    stop_at_step: int | None = None
    max_nonfinite_steps: int = 10
    progress: str = "auto"
    preempt_signals: list[str] = field(default_factory=lambda: list(PREEMPT_SIGNALS))
    save_every_minutes: float = 0.0  # as the vision trainer's (dinov.preemption)

    def __post_init__(self) -> None:
        check_preemption(self.preempt_signals, self.save_every_minutes)
        check_range("train.steps", self.steps, 1)
        check_range("train.micro_batch_size", self.micro_batch_size, 1)
        check_range("train.grad_accum", self.grad_accum, 1)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_range("train.log_every", self.log_every, 1)
        check_range("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_last", self.keep_last, 0)
        check_range("train.max_nonfinite_steps", self.max_nonfinite_steps, 0)
        check_choice("train.progress", self.progress, ("auto", "tqdm", "log", "none"))
        if self.stop_at_step is not None:
            check_range("train.stop_at_step", self.stop_at_step, 1)


@dataclass
class LMExportConfig:
    """The final ``save_pretrained`` directory ``output_dir/final``: with LoRA, the merged
    model (``merge_lora``) or the adapter alone (its base is ``model.path``)."""

    merge_lora: bool = True


@dataclass
class LMSyntheticConfig:
    """``dir``: write the tiny offline default there (once: word problems, a BPE tokenizer,
    a tiny Qwen2; :mod:`designers.lm.synthetic`) and train on it where ``model.path`` and
    ``data.path`` are not set. What ``configs/lm/smoke.yaml`` and the tests run."""

    dir: str | None = None
    seed: int = 0


@dataclass
class LMConfig:
    """A complete language-model run."""

    TRAINER: ClassVar[str] = "designers.lm.train"
    INPUT_PATH_KEYS: ClassVar[tuple[str, ...]] = ("model.path", "data.path", "feedback.train")
    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        "model.path", "model.lora.enabled", "model.lora.r", "model.lora.alpha",
        "model.lora.target_modules",
    )

    output_dir: str = "runs/lm"
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    feedback: LMFeedbackConfig = field(default_factory=LMFeedbackConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    export: LMExportConfig = field(default_factory=LMExportConfig)
    synthetic: LMSyntheticConfig = field(default_factory=LMSyntheticConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
