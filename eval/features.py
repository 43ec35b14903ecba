"""Frozen image-level features of an ImageFolder train/val pair, shared by ``eval.linear``
and ``eval.knn``.

This module owns:

- the ``data`` and ``features`` config sections of those two CLIs
  (:class:`ImageFolderDataConfig`, :class:`FeatureConfig`) and their validation;
- the evaluation transform: shorter side resized to ``data.resize_size``, centre crop of
  ``data.image_size`` (DINOv2's linear/kNN eval: 256 -> 224, bicubic), with torchvision's
  ``Resize``/``CenterCrop`` size and offset rounding; ImageNet normalisation follows;
- the feature kinds (DINOv2's ``create_linear_input``): ``cls`` (final-norm CLS token),
  ``cls_avgpool`` (CLS ++ mean patch token of the last block) and ``n_last_blocks`` (CLS
  of each of the last ``n`` blocks, each through the final norm, ++ the last block's mean
  patch token when ``features.avgpool``);
- :func:`load_imagefolder_features`: one batched pass per split through
  :func:`eval.common.extract` (progress bar, optional disk cache keyed on the model,
  its weights file, the data, every image file and the feature options). The backbone
  is built only when a split is not cached, so re-running an evaluation on cached
  features never touches the checkpoint.

Features are computed once on centre crops (no train-time augmentation), which is what
makes one pass of features enough for a whole grid of linear heads.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from dinov.config import ConfigError, ModelConfig
from dinov.data.datasets import LabelledImageFolder
from dinov.models import Backbone
from eval.common import (
    build_eval_backbone,
    cache_key,
    extract,
    files_digest,
    load_cache,
    save_cache,
)
from eval.heads import normalize

FEATURE_KINDS = ("cls", "cls_avgpool", "n_last_blocks")
INTERPOLATIONS = ("bicubic", "bilinear")
_EXPECTED_LAYOUT = "an ImageFolder root holding train/<class>/<image> and val/<class>/<image>"


@dataclass
class ImageFolderDataConfig:
    """A labelled ImageFolder dataset: ``root/{train_split,val_split}/<class>/<image>``.

    ``root`` is required (``data.root=/path/to/imagenet``). Every image is resized so its
    shorter side is ``resize_size`` (``interpolation``, antialiased) and centre-cropped to
    ``image_size``; val classes are indexed by the train split's class list.
    """

    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    resize_size: int = 256
    image_size: int = 224
    interpolation: str = "bicubic"
    batch_size: int = 128
    num_workers: int = 8


@dataclass
class FeatureConfig:
    """Which frozen features to extract, and where to cache them.

    ``kind``: ``cls`` (D), ``cls_avgpool`` (2D) or ``n_last_blocks`` (``n_last_blocks``
    * D, plus D with ``avgpool``); ``n_last_blocks``/``avgpool`` apply to that kind only.
    ``cache_dir``: a folder for ``<split>_<key>.pt`` feature files (``null``: no cache);
    linear and kNN runs with the same model, data and features share the files.
    """

    kind: str = "cls"
    n_last_blocks: int = 4
    avgpool: bool = True
    cache_dir: str | None = None


@dataclass
class SplitFeatures:
    features: Tensor  # (N, F) float32
    labels: Tensor  # (N,) int64


@dataclass
class FeatureSet:
    """Features of both splits plus the class names (train order, shared by val)."""

    train: SplitFeatures
    val: SplitFeatures
    classes: list[str]

    @property
    def dim(self) -> int:
        return int(self.train.features.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------------ config


def check_config(data: ImageFolderDataConfig, features: FeatureConfig) -> None:
    """Value checks the schema's types cannot express; raises ConfigError naming the key."""
    if data.root is None:
        raise ConfigError(f"config key 'data.root' is required: {_EXPECTED_LAYOUT}")
    if features.kind not in FEATURE_KINDS:
        raise ConfigError(
            f"config key 'features.kind' must be one of {list(FEATURE_KINDS)}, "
            f"got {features.kind!r}"
        )
    if data.interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"config key 'data.interpolation' must be one of {list(INTERPOLATIONS)}, "
            f"got {data.interpolation!r}"
        )
    if features.n_last_blocks < 1:
        raise ConfigError(
            f"config key 'features.n_last_blocks' must be >= 1, got {features.n_last_blocks}"
        )
    if not 0 < data.image_size <= data.resize_size:
        raise ConfigError(
            f"config keys 'data.image_size' ({data.image_size}) and 'data.resize_size' "
            f"({data.resize_size}) must satisfy 0 < image_size <= resize_size"
        )
    for key in ("batch_size", "num_workers"):
        minimum = 1 if key == "batch_size" else 0
        if getattr(data, key) < minimum:
            raise ConfigError(f"config key 'data.{key}' must be >= {minimum}")


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------- transform


@dataclass(frozen=True)
class EvalTransform:
    """(3, H, W) in [0, 1] -> shorter side ``resize_size`` -> centre ``image_size`` crop.

    Sizes and offsets are computed as torchvision's ``Resize(int)`` (long side truncated)
    and ``CenterCrop`` (offsets rounded) compute them, so crops land on the same pixels as
    the reference DINOv2 evaluation. A picklable class, for DataLoader workers.
    """

    resize_size: int
    image_size: int
    interpolation: str = "bicubic"

    def __call__(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.resize_size * long / short)
        shape = (self.resize_size, new_long) if h <= w else (new_long, self.resize_size)
        if shape != (h, w):
            image = F.interpolate(
                image[None], size=shape, mode=self.interpolation, align_corners=False,
                antialias=True,
            )[0]
            # Bicubic overshoots; the reference resizes uint8 images, which saturate.
            image = image.clamp_(0.0, 1.0)
        top = int(round((shape[0] - self.image_size) / 2.0))
        left = int(round((shape[1] - self.image_size) / 2.0))
        return image[:, top : top + self.image_size, left : left + self.image_size]


# ---------------------------------------------------------------------- datasets


def open_splits(data: ImageFolderDataConfig) -> tuple[LabelledImageFolder, LabelledImageFolder]:
    """The train and val ImageFolders; missing folders are errors naming ``data.root``."""
    root = pathlib.Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} does not exist; expected {_EXPECTED_LAYOUT}")
    folders = {}
    for split in (data.train_split, data.val_split):
        folders[split] = root / split
        if not folders[split].is_dir():
            raise FileNotFoundError(
                f"data.root: {root} has no '{split}' folder ({folders[split]}); "
                f"expected {_EXPECTED_LAYOUT}"
            )
    transform = EvalTransform(data.resize_size, data.image_size, data.interpolation)
    train = LabelledImageFolder(folders[data.train_split], None, transform=transform)
    # A val class unknown to train would be dropped silently and change the metric.
    unknown = sorted(
        e.name for e in os.scandir(folders[data.val_split])
        if e.is_dir() and e.name not in train.classes
    )
    if unknown:
        raise ValueError(
            f"data.root: {folders[data.val_split]} has classes missing from "
            f"{folders[data.train_split]}: {unknown[:10]}"
        )
    val = LabelledImageFolder(
        folders[data.val_split], None, classes=train.classes, transform=transform
    )
    return train, val


# ---------------------------------------------------------------------- features


def _blocks_and_pool(features: FeatureConfig) -> tuple[int, bool]:
    """(number of last blocks whose CLS is used, whether the mean patch token is appended)."""
    if features.kind == "cls":
        return 1, False
    if features.kind == "cls_avgpool":
        return 1, True
    return features.n_last_blocks, features.avgpool


def feature_dim(embed_dim: int, features: FeatureConfig) -> int:
    n, avgpool = _blocks_and_pool(features)
    return (n + int(avgpool)) * embed_dim


@torch.no_grad()
def image_features(backbone: Backbone, images: Tensor, features: FeatureConfig) -> Tensor:
    """(B, 3, H, W) ImageNet-normalised images -> (B, F) features of ``features.kind``."""
    n, avgpool = _blocks_and_pool(features)
    if n > backbone.num_blocks:
        raise ValueError(
            f"features.n_last_blocks={n} but the backbone has {backbone.num_blocks} blocks"
        )
    # Each block's output goes through the final norm, as DINOv2's linear eval does.
    outputs = backbone.forward_intermediates(images, n, norm=True)
    parts = [out.cls for out in outputs]
    if avgpool:
        parts.append(outputs[-1].patch.mean(dim=1))
    return torch.cat(parts, dim=-1).float()


class _LazyBackbone:
    """Builds the backbone on first use, so fully cached runs never load the weights."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._backbone: Backbone | None = None

    def get(self) -> Backbone:
        if self._backbone is None:
            self._backbone = build_eval_backbone(self.cfg, self.device)
        return self._backbone


def _feature_options(features: FeatureConfig) -> dict[str, Any]:
    """Only the options that change the features (kind ``cls`` ignores n/avgpool)."""
    n, avgpool = _blocks_and_pool(features)
    return {"n_last_blocks": n, "avgpool": avgpool}


def split_cache_file(
    model: ModelConfig, data: ImageFolderDataConfig, features: FeatureConfig,
    split: str, dataset: LabelledImageFolder,
) -> pathlib.Path | None:
    """``cache_dir/<split>_<key>.pt``; the key covers everything the features depend on."""
    if features.cache_dir is None:
        return None
    key = cache_key(
        model,
        model.weights,  # as a path: its size and mtime enter the key
        {k: getattr(data, k) for k in ("resize_size", "image_size", "interpolation")},
        str(pathlib.Path(str(data.root)).expanduser().resolve() / split),
        len(dataset),
        dataset.classes,
        files_digest(dataset.paths, dataset.root),
        _feature_options(features),
    )
    return pathlib.Path(features.cache_dir).expanduser() / f"{split}_{key}.pt"


def _extract_split(
    dataset: LabelledImageFolder, split: str, lazy: _LazyBackbone,
    data: ImageFolderDataConfig, features: FeatureConfig, cache_file: pathlib.Path | None,
) -> SplitFeatures:
    loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=False,
                        num_workers=data.num_workers, pin_memory=lazy.device.type == "cuda")

    def run(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images = normalize(batch[0].to(lazy.device, non_blocking=True))
        return {"features": image_features(lazy.get(), images, features), "labels": batch[1]}

    start = time.perf_counter()
    out = load_cache(cache_file)
    how = f"loaded from {cache_file}"
    if out is None:
        out = extract(loader, run, desc=f"{split} features", total=len(loader))
        save_cache(out, cache_file)
        how = f"extracted in {time.perf_counter() - start:.1f}s"
    if out["features"].shape[0] != len(dataset):
        raise RuntimeError(
            f"{cache_file}: {out['features'].shape[0]} rows for {len(dataset)} images"
        )
    print(f"{split}: {len(dataset)} images -> features {tuple(out['features'].shape)} ({how})",
          file=sys.stderr)
    return SplitFeatures(out["features"], out["labels"].long())


def load_imagefolder_features(
    model: ModelConfig, data: ImageFolderDataConfig, features: FeatureConfig,
    device: torch.device | str = "cpu",
) -> FeatureSet:
    """Train and val features of ``data`` under ``model`` (from the cache when present)."""
    # Fail before listing a large dataset, and even when every split is cached.
    if model.weights is not None and not pathlib.Path(model.weights).is_file():
        raise FileNotFoundError(f"model.weights: file not found: {model.weights}")
    train_ds, val_ds = open_splits(data)
    if model.weights is None:
        print("model.weights is null: evaluating a randomly initialised backbone", file=sys.stderr)
    lazy = _LazyBackbone(model, torch.device(device))
    splits = {}
    for split, dataset in ((data.train_split, train_ds), (data.val_split, val_ds)):
        cache_file = split_cache_file(model, data, features, split, dataset)
        splits[split] = _extract_split(dataset, split, lazy, data, features, cache_file)
    return FeatureSet(splits[data.train_split], splits[data.val_split], list(train_ds.classes))


def describe_features(fs: FeatureSet, features: FeatureConfig) -> dict[str, Any]:
    """The feature facts every results.json records."""
    return {
        "feature_kind": features.kind,
        **_feature_options(features),
        "feature_dim": fs.dim,
        "num_classes": fs.num_classes,
        "num_train": int(fs.train.features.shape[0]),
        "num_val": int(fs.val.features.shape[0]),
    }


def model_summary(model: ModelConfig) -> dict[str, Any]:
    """The backbone as evaluated (our checkpoints: the architecture saved in them)."""
    from eval.common import resolve_model_config

    return dataclasses.asdict(resolve_model_config(model))
