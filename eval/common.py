"""What every evaluation CLI shares: the backbone source, feature extraction and caching,
and the vision backbones' sources (the pipelines' shared entry, error path and outputs are
in :mod:`eval.pipeline`).

A backbone comes from one of: a checkpoint of our trainer (``model.weights=ckpt.pt``,
``model.weights_format=ours`` or ``auto``; the architecture is read from the checkpoint's
saved config, ``model.weights_key`` picks ``teacher`` or ``student``), an official
DINOv2/DINOv3 file (``weights_format=dinov2|dinov3`` with ``model.arch``), or a timm
model name plus a local timm state dict (``weights_format=timm``). ``model.weights=null``
evaluates the architecture at initialisation (a baseline for comparisons).

Feature caches are keyed on everything their content depends on, the dataset's files
included (:func:`files_digest`); they are written atomically, and a cache file that
cannot be read is a miss (with a warning naming it) and is overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from tqdm import tqdm

from dinov.checkpoint import atomic_torch_save, load_tensor_file
from dinov.config import ModelConfig
from dinov.models import Backbone, build_backbone, load_backbone_weights


def _checkpoint_model_config(path: pathlib.Path) -> ModelConfig | None:
    """The ModelConfig saved in one of our training checkpoints, or None for other files.

    Called for every eval run (and by feature-cache keys): the file is memory-mapped, so
    reading the config string does not read the checkpoint's tensors.
    """
    raw = load_tensor_file(path)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), str) and "model" in raw):
        return None
    saved = OmegaConf.create(raw["config"]).get("model")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), saved)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """For our own checkpoints the architecture comes from the checkpoint's config."""
    if not cfg.weights or cfg.weights_format not in ("auto", "ours"):
        return cfg
    path = pathlib.Path(cfg.weights)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: checkpoint file not found: {path}")
    saved = _checkpoint_model_config(path)
    if saved is None:
        return cfg
    # pos_interp: the checkpoint's recorded value unless this run sets one.
    pos_interp = saved.pos_interp if cfg.pos_interp == "auto" else cfg.pos_interp
    return dataclasses.replace(saved, weights=cfg.weights, weights_format="ours",
                               weights_key=cfg.weights_key, attention=cfg.attention,
                               pos_interp=pos_interp)


def build_eval_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """A frozen backbone in eval mode, built and loaded as the module docstring describes."""
    cfg = resolve_model_config(cfg)
    backbone = build_backbone(cfg)
    if cfg.weights:
        report = load_backbone_weights(backbone, cfg.weights, cfg.weights_format, cfg.weights_key,
                                       cfg.pos_interp)
        print(report.summary(), file=sys.stderr)
    backbone.requires_grad_(False)
    backbone.cache_positions()  # frozen: one table resize per input grid, not per forward
    return backbone.eval().to(device)


def cache_key(*parts: Any) -> str:
    """A stable hash of the things a feature cache depends on (weights file mtime included)."""
    text = json.dumps([_describe(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe(part: Any) -> Any:
    """JSON-able description; files (also inside dataclasses) add their size and mtime."""
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return {k: _describe(v) for k, v in dataclasses.asdict(part).items()}
    if isinstance(part, dict):
        return {k: _describe(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return [_describe(v) for v in part]
    if isinstance(part, (str, pathlib.Path)) and pathlib.Path(part).is_file():
        stat = pathlib.Path(part).stat()
        return [str(part), stat.st_size, stat.st_mtime_ns]
    return part


def files_digest(paths: Sequence[str | pathlib.Path], root: str | pathlib.Path) -> str:
    """A hash of the listed files: each one's path relative to ``root``, size and mtime.

    One ``stat`` per file and no reading of their bytes (about 1 s per 100k files here,
    so some 15 s for ImageNet's train split); a file replaced in place changes its size
    or mtime and so the key. Files outside ``root`` enter with their full path.
    """
    digest = hashlib.sha256()
    prefix = os.path.join(str(root), "")  # a string prefix: os.path.relpath per file is slow
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"dataset file {path} does not exist") from None
        name = str(path).removeprefix(prefix)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_cache(path: str | pathlib.Path | None) -> dict[str, Any] | None:
    """The dict saved at ``path``; None when there is none or it cannot be read.

    A file that cannot be read (a write killed before atomic saves, a foreign file) is a
    miss with a warning naming it; the caller recomputes and overwrites it.
    """
    if path is None or not pathlib.Path(path).is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files fail in torch with several error types
        warnings.warn(f"feature cache {path} cannot be read ({type(error).__name__}: {error}); "
                      "recomputing and overwriting it", stacklevel=2)
        return None
    if not isinstance(cached, dict):
        warnings.warn(f"feature cache {path} holds a {type(cached).__name__}, not a dict; "
                      "recomputing and overwriting it", stacklevel=2)
        return None
    return cached


def save_cache(obj: dict[str, Any], path: str | pathlib.Path | None) -> None:
    """Write ``obj`` to ``path`` atomically; a failed write only warns (the result stands)."""
    if path is None:
        return
    try:
        atomic_torch_save(obj, path)
    except OSError as error:
        warnings.warn(f"feature cache {path} could not be written: {error}", stacklevel=2)


@torch.no_grad()
def extract(batches: Iterable[Any], fn: Callable[[Any], dict[str, Tensor]], desc: str,
            total: int | None = None, cache_file: str | pathlib.Path | None = None) -> dict[str, Tensor]:
    """Run ``fn`` over ``batches`` and concatenate each output key on the CPU.

    With ``cache_file`` the result is loaded from it when it can be read, else computed
    and saved to it (:func:`load_cache`, :func:`save_cache`). Progress shows as a tqdm bar
    on a terminal and stays quiet otherwise.
    """
    cached = load_cache(cache_file)
    if cached is not None:
        return cached
    outputs: dict[str, list[Tensor]] = {}
    for batch in tqdm(batches, desc=desc, total=total, disable=not sys.stderr.isatty()):
        for key, value in fn(batch).items():
            outputs.setdefault(key, []).append(value.detach().cpu())
    result = {key: torch.cat(values) for key, values in outputs.items()}
    save_cache(result, cache_file)
    return result


