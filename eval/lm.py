"""Causal language models from local files, for evaluation and for training.

This module owns how a model directory becomes a ``transformers`` model and tokenizer,
and the checks that make a bad directory one clear error before any work:

- a Hugging Face ``from_pretrained`` directory (``config.json`` + weights, with a
  tokenizer), loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
  ``local_files_only`` (nothing is downloaded);
- a LoRA adapter directory (``adapter_config.json``, as ``peft`` saves it): its base model
  directory (``base_model_name_or_path``, a local path) is loaded and the adapter applied;
- a checkpoint file of our LM trainer (``checkpoints/checkpoint_*.pt``): the model its
  saved config names (``model.path``, ``model.lora``) with the checkpoint's weights (all
  of them for full-parameter training, the adapters' for LoRA);
- :func:`apply_lora`: the LoRA branch of training (``peft``), refusing target modules
  the model does not have.

Checks: the directory, its ``config.json``, weights and tokenizer exist; the tokenizer's
vocabulary fits the model's embeddings (a tokenizer of another model is refused); a
sequence length fits the model's positions. ``transformers`` and ``peft`` are the ``lm``
extra, imported lazily with a message saying what to install. No vision code here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

import dinov  # noqa: F401  (torchvision shim first: transformers imports torchvision)
from dinov.config import ConfigError, check_choice, check_range

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = ("float32", "bfloat16")
ATTENTION = ("eager", "sdpa")
QWEN_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """The LoRA branch (``peft``); the published setting is r 8, alpha 16, dropout 0.05 on
    q/k/v/o/gate/up/down."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_LORA_TARGETS))

    def __post_init__(self) -> None:
        check_range("model.lora.r", self.r, 1)
        check_range("model.lora.alpha", self.alpha, 1)
        check_range("model.lora.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.enabled and not self.target_modules:
            raise ConfigError("config key 'model.lora.target_modules' must name at least one module")


@dataclass
class LMModelConfig:
    """A causal LM from a local directory (``path``: an HF directory or a LoRA adapter
    directory); ``dtype`` of its weights; ``attn_implementation`` (``eager`` is needed for
    forward-mode AD through attention; ``sdpa`` is faster)."""

    path: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.attn_implementation", self.attn_implementation, ATTENTION)


def _require_lm_extra() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError("the language-model module needs the lm extra: "
                          "pip install 'vpretrain[lm]'") from error


def check_model_dir(path: str | pathlib.Path, what: str = "model.path") -> pathlib.Path:
    """``path`` as a directory holding a config, weights and a tokenizer (or a LoRA adapter);
    FileNotFoundError naming what is missing otherwise."""
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}: {directory} is not a directory (expected a Hugging "
                                f"Face model directory, as save_pretrained writes it)")
    if (directory / ADAPTER_CONFIG).is_file():
        return directory
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {directory} has no config.json")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: {directory} has no weights (expected one of "
                                f"{', '.join(WEIGHT_FILES)})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: {directory} has no tokenizer (expected one of "
                                f"{', '.join(TOKENIZER_FILES)})")
    return directory


def adapter_base(directory: pathlib.Path) -> pathlib.Path | None:
    """The base model directory of a LoRA adapter directory (None for a full model)."""
    config = directory / ADAPTER_CONFIG
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{config}: no base_model_name_or_path")
    base_dir = pathlib.Path(base).expanduser()
    return base_dir if base_dir.is_absolute() else (directory / base_dir)


def load_causal_lm(cfg: LMModelConfig, what: str = "model.path") -> tuple[Any, Any]:
    """(model, tokenizer) from ``cfg.path`` (module docstring); the model in train mode
    off (``eval()``), its tokenizer with a pad token (the EOS token when it has none)."""
    _require_lm_extra()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.path is None:
        raise ConfigError(f"config key '{what}' is required: a local Hugging Face model directory")
    if pathlib.Path(cfg.path).suffix == ".pt":
        return load_training_checkpoint(pathlib.Path(cfg.path), cfg, what)
    directory = check_model_dir(cfg.path, what)
    base = adapter_base(directory)
    model_dir = check_model_dir(base, f"{what} (the adapter's base model)") if base else directory
    tokenizer = AutoTokenizer.from_pretrained(str(directory if base is None else model_dir),
                                              local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=getattr(torch, cfg.dtype),
        attn_implementation=cfg.attn_implementation)
    check_vocabulary(model, tokenizer, model_dir)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    return model.eval(), tokenizer


def check_vocabulary(model: Any, tokenizer: Any, directory: pathlib.Path) -> None:
    """The tokenizer's ids must index the model's embedding rows."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embeddings have {rows} rows: a tokenizer of another model?")


def check_positions(model: Any, seq_len: int, key: str = "data.seq_len") -> None:
    """A sequence of ``seq_len`` tokens must fit the model's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"config key '{key}' ({seq_len}) exceeds the model's "
                          f"max_position_embeddings ({limit})")


def apply_lora(model: Any, cfg: LoRAConfig) -> Any:
    """The model with LoRA adapters on ``cfg.target_modules`` (only they train)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - names)
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if type(module).__name__ == "Linear"})
        raise ConfigError(f"config key 'model.lora.target_modules': the model has no modules "
                          f"{missing}; its linear modules are {linear}")
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def trainable_state(model: Any) -> dict[str, Any]:
    """What a checkpoint of the LM trainer keeps of ``model``: every parameter that trains
    (the whole model for full-parameter training, the adapters for LoRA; the frozen base is
    read from ``model.path`` again)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_training_checkpoint(path: pathlib.Path, cfg: LMModelConfig,
                             what: str = "model.path") -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint of our LM trainer (module docstring)."""
    import torch
    from omegaconf import OmegaConf

    from dinov.checkpoint import load_tensor_file

    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint file not found: {path}")
    raw = load_tensor_file(path)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), str) and "model" in raw):
        raise ValueError(f"{path}: not a checkpoint of the LM trainer (no config and model)")
    saved = OmegaConf.to_container(OmegaConf.create(raw["config"]).get("model"))
    base = LMModelConfig(path=saved["path"], dtype=cfg.dtype,
                         attn_implementation=cfg.attn_implementation,
                         lora=LoRAConfig(**saved["lora"]))
    model, tokenizer = load_causal_lm(dataclasses.replace(base, lora=LoRAConfig()),
                                      f"{path}: its model.path")
    if base.lora.enabled:
        model = apply_lora(model, base.lora)
    expected = set(trainable_state(model))
    state = raw["model"]
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{path} does not fit its model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer
