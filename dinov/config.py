"""Typed run configuration: dataclass schemas merged with OmegaConf.

Precedence is schema defaults <- YAML file <- command-line ``key=value`` overrides.
Unknown keys and values of the wrong type are errors (:class:`ConfigError`) whose
message names the dotted key, where it came from (the YAML path or "command line")
and what was expected. Schemas for later parts (designers, feedback, value) extend
:class:`Config` by subclassing, and :func:`load_config` takes the schema class.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type or range."""


def check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


PREEMPT_SIGNALS = ("SIGUSR2", "SIGTERM")  # submitit's requeue signal (USR1 may be NCCL's)


def check_preemption(signals: list[str], save_every_minutes: float) -> None:
    """``train.preempt_signals`` are signal names; ``train.save_every_minutes`` >= 0."""
    for name in signals:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise ConfigError(f"config key 'train.preempt_signals' must hold signal names such as "
                              f"SIGUSR2 or SIGTERM, got {name!r}")
    check_range("train.save_every_minutes", save_every_minutes, 0)


def check_range(key: str, value: float | int, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` lies in the given interval."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if high is None:
        expected = f"{'>' if low_open else '>='} {low}"
    elif low is None:
        expected = f"{'<' if high_open else '<='} {high}"
    else:
        expected = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")


@dataclass
class DataConfig:
    """Unlabelled pretraining images.

    ``kind``: ``synthetic`` (procedural scenes generated in memory from ``seed``),
    ``imagefolder`` (torchvision ImageFolder layout under ``path``; labels ignored) or
    ``folder`` (every image below ``path``, or the lines of a file list at ``path``).
    Every image is resized (shorter side) and centre-cropped to ``image_size`` so that
    the multicrop augmentation runs batched on tensors.
    """

    kind: str = "synthetic"
    path: str | None = None
    image_size: int = 64
    num_samples: int = 512
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, ("synthetic", "imagefolder", "folder"))
        check_range("data.image_size", self.image_size, 1)
        check_range("data.num_samples", self.num_samples, 1)
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.num_workers", self.num_workers, 0)


@dataclass
class CropsConfig:
    """DINO multicrop; defaults are DINOv2's (224/96 px, 2 global + 8 local crops)."""

    global_crops_size: int = 224
    local_crops_size: int = 96
    local_crops_number: int = 8
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    horizontal_flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob_global1: float = 1.0
    blur_prob_global2: float = 0.1
    blur_prob_local: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_prob_global2: float = 0.2
    normalize_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        check_range("crops.global_crops_size", self.global_crops_size, 1)
        check_range("crops.local_crops_size", self.local_crops_size, 1)
        check_range("crops.local_crops_number", self.local_crops_number, 0)
        for key in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
            pair = getattr(self, key)
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ConfigError(f"config key 'crops.{key}' must be [low, high] with "
                                  f"0 < low <= high, got {pair}")
        for key in ("horizontal_flip_prob", "color_jitter_prob", "grayscale_prob",
                    "blur_prob_global1", "blur_prob_global2", "blur_prob_local",
                    "solarize_prob_global2"):
            check_range(f"crops.{key}", getattr(self, key), 0.0, 1.0)
        if any(std <= 0 for std in self.normalize_std):
            raise ConfigError(f"config key 'crops.normalize_std' must be > 0, got {self.normalize_std}")


@dataclass
class MaskConfig:
    """iBOT block masking of the student's global crops (DINOv2 defaults)."""

    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    min_num_patches: int = 4
    max_aspect_ratio: float = 3.0

    def __post_init__(self) -> None:
        check_range("masks.mask_sample_probability", self.mask_sample_probability, 0.0, 1.0)
        ratio = self.mask_ratio_min_max
        if len(ratio) != 2 or not 0 <= ratio[0] <= ratio[1] <= 1:
            raise ConfigError(f"config key 'masks.mask_ratio_min_max' must be [low, high] with "
                              f"0 <= low <= high <= 1, got {ratio}")
        check_range("masks.min_num_patches", self.min_num_patches, 1)
        check_range("masks.max_aspect_ratio", self.max_aspect_ratio, 1.0)


@dataclass
class ModelConfig:
    """Backbone built through timm.

    ``arch`` is a timm model name (``vit_small_patch14_dinov2``,
    ``vit_large_patch16_dinov3``, ...). ``embed_dim``/``depth``/``num_heads`` override
    the architecture's values (``null`` keeps them) for small CPU models.
    ``weights`` is a local checkpoint file; ``weights_format`` is ``auto``, ``dinov2``,
    ``dinov3``, ``timm`` or ``ours`` (a checkpoint of this trainer).

    ``img_size`` is the size the model is built for; a loaded file's position table
    keeps its own grid whatever it is. ``pos_interp`` is how that table is resized to
    other input grids: ``auto`` takes it from the weights (``dinov2`` or ``dinov2_reg``
    for official DINOv2 files, the recorded value for our checkpoints, ``timm``
    otherwise); ``dinov2``, ``dinov2_reg`` or ``timm`` force one. Checkpoints record the
    resolved value, so they evaluate the way they trained.
    """

    arch: str = "vit_small_patch14_dinov2"
    img_size: int = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_register_tokens: int | None = None
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None
    weights: str | None = None
    weights_format: str = "auto"
    weights_key: str = "teacher"
    attention: str = "sdpa"
    pos_interp: str = "auto"

    def __post_init__(self) -> None:
        check_choice("model.weights_format", self.weights_format,
                     ("auto", "dinov2", "dinov3", "timm", "ours"))
        check_choice("model.weights_key", self.weights_key, ("teacher", "student"))
        check_choice("model.attention", self.attention, ("sdpa", "xformers"))
        check_choice("model.pos_interp", self.pos_interp, ("auto", "dinov2", "dinov2_reg", "timm"))
        check_range("model.img_size", self.img_size, 1)
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key) is not None:
                check_range(f"model.{key}", getattr(self, key), 1)
        if self.num_register_tokens is not None:
            check_range("model.num_register_tokens", self.num_register_tokens, 0)
        check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)


@dataclass
class HeadConfig:
    """DINO/iBOT projection heads (DINOv2 defaults: 65536 prototypes, shared head)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536

    def __post_init__(self) -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers", "ibot_out_dim"):
            check_range(f"head.{key}", getattr(self, key), 1)


@dataclass
class LossConfig:
    """Loss weights, temperatures and centering (``softmax`` or ``sinkhorn_knopp``)."""

    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0

    def __post_init__(self) -> None:
        check_choice("loss.centering", self.centering, ("softmax", "sinkhorn_knopp"))
        for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
            check_range(f"loss.{key}", getattr(self, key), 0.0)
        # the temperatures divide the logits
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check_range(f"loss.{key}", getattr(self, key), 0.0, low_open=True)
        check_range("loss.center_momentum", self.center_momentum, 0.0, 1.0)
        check_range("loss.sinkhorn_iterations", self.sinkhorn_iterations, 1)
        check_range("loss.warmup_teacher_temp_steps", self.warmup_teacher_temp_steps, 0)


@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay and cosine schedules (all measured in steps)."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, 0.0)  # negative: gradient ascent
        check_range("optim.min_lr", self.min_lr, 0.0)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.weight_decay_end", self.weight_decay_end, 0.0)
        check_range("optim.momentum_teacher", self.momentum_teacher, 0.0, 1.0)
        check_range("optim.final_momentum_teacher", self.final_momentum_teacher, 0.0, 1.0)
        check_range("optim.layerwise_decay", self.layerwise_decay, 0.0, 1.0, low_open=True)
        check_range("optim.patch_embed_lr_mult", self.patch_embed_lr_mult, 0.0)
        check_range("optim.clip_grad", self.clip_grad, 0.0)  # 0: no clipping
        check_range("optim.freeze_last_layer_steps", self.freeze_last_layer_steps, 0)
        check_range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)


@dataclass
class ProbeConfig:
    """Online linear probe on frozen CLS features of labelled synthetic scenes."""

    enabled: bool = True
    every: int = 0
    num_train: int = 256
    num_val: int = 256
    seed: int = 1234
    epochs: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        check_range("probe.every", self.every, 0)
        check_range("probe.num_train", self.num_train, 1)
        check_range("probe.num_val", self.num_val, 1)
        check_range("probe.epochs", self.epochs, 1)
        check_range("probe.lr", self.lr, 0.0, low_open=True)
        check_range("probe.weight_decay", self.weight_decay, 0.0)


@dataclass
class TrainConfig:
    """Loop length, logging, checkpointing and precision."""

    steps: int = 100
    seed: int = 0
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every: int = 50
    keep_last: int = 3
    resume: bool = False
    stop_at_step: int | None = None
    max_nonfinite_steps: int = 10
    progress: str = "auto"
    plots: bool = True
    # save and stop at the next step on these signals (dinov.preemption); also save
    # every this many minutes of wall time (0: only at checkpoint_every)
    preempt_signals: list[str] = field(default_factory=lambda: list(PREEMPT_SIGNALS))
    save_every_minutes: float = 0.0

    def __post_init__(self) -> None:
        check_preemption(self.preempt_signals, self.save_every_minutes)
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check_choice("train.progress", self.progress, ("auto", "tqdm", "log", "none"))
        check_range("train.steps", self.steps, 1)
        check_range("train.log_every", self.log_every, 1)  # a modulus
        check_range("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_last", self.keep_last, 0)
        check_range("train.max_nonfinite_steps", self.max_nonfinite_steps, 0)
        if self.stop_at_step is not None:
            check_range("train.stop_at_step", self.stop_at_step, 1)


@dataclass
class CheckpointConfig:
    """How checkpoints are written: ``file`` (one atomic file: every rank's state gathered
    on rank 0), ``dcp`` (a sharded directory through torch.distributed.checkpoint: each
    rank writes its shards, it loads on any world size; :mod:`dinov.sharded`) or ``auto``
    (``dcp`` under FSDP, ``file`` otherwise). Either kind resumes either way."""

    format: str = "auto"

    def __post_init__(self) -> None:
        check_choice("checkpoint.format", self.format, ("auto", "file", "dcp"))


@dataclass
class LogConfig:
    """Where a run's rows go besides ``metrics.jsonl``: ``tensorboard`` also writes them as
    TensorBoard scalars under ``output_dir/tensorboard`` (the ``tensorboard`` extra)."""

    tensorboard: bool = False


@dataclass
class DistributedConfig:
    """``strategy``: ``auto`` (DDP when launched with several processes), ``ddp``, ``fsdp`` or
    ``none``. ``timeout_minutes``: how long a collective waits for the other ranks before
    the process group gives up (torch's default is 10 minutes for NCCL, 30 for gloo; a
    save of a large sharded state or a slow file system may need more)."""

    strategy: str = "auto"
    backend: str = "auto"
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        check_choice("dist.strategy", self.strategy, ("auto", "ddp", "fsdp", "none"))
        check_choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        check_range("dist.timeout_minutes", self.timeout_minutes, 0, low_open=True)


@dataclass
class Config:
    """A complete learner run.

    ``ARCHITECTURE_KEYS`` (dotted keys, or whole sections) shape a checkpoint's tensors
    and states: a resume with any of them changed is refused (:mod:`dinov.runs`).
    """

    TRAINER: ClassVar[str] = "dinov.train"  # the entry point whose checkpoints this schema resumes
    # files and folders the run reads: checked before a job is submitted (slurm.submit)
    INPUT_PATH_KEYS: ClassVar[tuple[str, ...]] = ("data.path", "model.weights")
    ARCHITECTURE_KEYS: ClassVar[tuple[str, ...]] = (
        "model.arch", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
        "model.num_heads", "model.num_register_tokens", "head",
    )

    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


ConfigT = TypeVar("ConfigT")



def _expected_type(schema: type, dotted_key: str) -> str:
    """The annotation of ``dotted_key`` in the dataclass ``schema``, as text."""
    current: Any = schema
    annotation: Any = None
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(current):
            return "a value of the schema's type"
        hints = typing.get_type_hints(current)
        if part not in hints:
            return "a value of the schema's type"
        annotation = hints[part]
        current = annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _raise_for(error: OmegaConfBaseException, source: str, schema: type) -> typing.NoReturn:
    key = getattr(error, "full_key", None) or "<unknown>"
    if isinstance(error, ConfigKeyError) or "not in" in str(error):
        renamed = getattr(schema, "RENAMED_KEYS", {}).get(key)
        if renamed is not None:
            raise ConfigError(f"{source}: config key '{key}' is now '{renamed}'") from None
        raise ConfigError(f"{source}: unknown config key '{key}'") from None
    if isinstance(error, ValidationError):
        value = getattr(error, "value", None)
        raise ConfigError(
            f"{source}: config key '{key}' expects {_expected_type(schema, key)}, got {value!r}"
        ) from None
    raise ConfigError(f"{source}: invalid config at '{key}': {error.msg}") from None


def _merge(base: DictConfig, other: Any, source: str, schema: type) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        _raise_for(error, source, schema)
    assert isinstance(merged, DictConfig)
    return merged


def _yaml_chain(yaml_path: pathlib.Path, seen: list[pathlib.Path]) -> list[tuple[pathlib.Path, Any]]:
    """``yaml_path`` and the files it extends, base first.

    A file may name ``base: other.yaml`` (relative to itself): its own values then
    override the base's, so a twin recipe (baseline, random feedback) states only what
    differs.
    """
    if not yaml_path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {yaml_path}{where}")
    if yaml_path.resolve() in seen:
        raise ConfigError(f"{yaml_path}: 'base' chain is circular: "
                          f"{' -> '.join(map(str, [*seen, yaml_path.resolve()]))}")
    try:
        from_file = OmegaConf.load(yaml_path)
    except Exception as error:  # YAML syntax errors come from several libraries
        raise ConfigError(f"{yaml_path}: not valid YAML: {error}") from None
    base = from_file.pop("base", None) if isinstance(from_file, DictConfig) else None
    if base is None:
        return [(yaml_path, from_file)]
    if not isinstance(base, str):
        raise ConfigError(f"{yaml_path}: 'base' expects a file name, got {base!r}")
    chain = _yaml_chain(yaml_path.parent / base, [*seen, yaml_path.resolve()])
    return [*chain, (yaml_path, from_file)]


def load_config(
    path: str | pathlib.Path | None,
    overrides: list[str] | None = None,
    schema: type[ConfigT] = Config,  # type: ignore[assignment]
) -> ConfigT:
    """Schema defaults <- YAML at ``path`` <- ``key=value`` overrides; returns a typed object.

    Values are checked by the schema's own ``__post_init__`` (ranges, choices), so every
    check lives next to its field. A key a YAML file marks ``???`` and nothing sets is an
    error naming it and the file.
    """
    cfg, unset = load_config_with_unset(path, overrides, schema)
    if unset:
        raise ConfigError(f"config keys required but without a value: {', '.join(unset)}; "
                          f"set them as key=value")
    return cfg


def load_config_with_unset(
    path: str | pathlib.Path | None,
    overrides: list[str] | None = None,
    schema: type[ConfigT] = Config,  # type: ignore[assignment]
) -> tuple[ConfigT, list[str]]:
    """:func:`load_config`, but the ``???`` keys nothing set are returned (as None in the
    config, and each described with its file) instead of refused: what a dry run shows."""
    cfg = OmegaConf.structured(schema)
    required: dict[str, pathlib.Path] = {}  # keys a YAML file marks ??? (merging drops the mark)
    if path is not None:
        for yaml_path, from_file in _yaml_chain(pathlib.Path(path), []):
            required.update(dict.fromkeys(OmegaConf.missing_keys(from_file), yaml_path))
            cfg = _merge(cfg, from_file, str(yaml_path), schema)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command line: expected key=value, got {item!r}")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), "command line", schema)
    unset = [f"'{key}' (marked ??? in {yaml_path})" for key, yaml_path in required.items()
             if OmegaConf.select(cfg, key, default=None) is None]
    try:
        return typing.cast(ConfigT, OmegaConf.to_object(cfg)), unset
    except MissingMandatoryValue as error:
        raise ConfigError(f"config key '{error.full_key}' is required but has no value "
                          f"(set it in the YAML file or as {error.full_key}=...)") from None
    except ValueError as error:  # a schema's own range check (__post_init__); names its key
        raise ConfigError(str(error)) from None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML text (what a run saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(to_yaml(config))
