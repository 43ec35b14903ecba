"""ADE20K semantic segmentation with a linear + BN head on a frozen backbone (mIoU).

``python -m eval.segmentation --config configs/eval/segmentation.yaml key=value ...``

The backbone comes from any source :mod:`eval.common` understands (our trainer's
checkpoint, teacher or student; an official DINOv2/DINOv3 file; a timm model name plus a
local state dict; or ``model.weights=null`` for the architecture at initialisation).
The head is :class:`eval.heads.LinearBNSegHead` on the normed patch tokens of the last
``head.n_last_blocks`` blocks, concatenated (DINOv2's "linear" evaluation is n=1 with
single-scale inference; its "+ms" variant is n=4 with multi-scale + flip inference).

Recipe (the defaults, DINOv2's linear ADE20K setting in mmseg): AdamW lr 1e-3,
weight decay 1e-4 (on every head parameter, as mmseg's plain AdamW), betas (0.9, 0.999),
40k iterations at batch 16, poly decay (power 1, to 0) after a 1,500-iteration linear
warm-up from 1e-6 x lr; pixel cross-entropy at crop resolution with ignore index 255.

Training data, one rule (``train.augment``):

- ``true`` (default, the standard pipeline): mmseg's ADE20K training transforms on
  tensors -- random rescale of the shorter side to ``image_size * U(0.5, 2.0)``, a random
  ``image_size`` crop (re-drawn up to 10 times while one class covers more than
  ``cat_max_ratio`` of it), horizontal flip with p = 0.5, padding to the crop size (mean
  colour, label ``ignore_index``). Every crop is new, so the frozen backbone runs on each
  batch under ``no_grad``. PhotoMetricDistortion is left out: the issue's pipeline is
  resize + crop + flip, and the synthetic scenes carry class identity in hue.
- ``false``: every training image is resized (shorter side) and centre-cropped to
  ``image_size`` once, its patch features are extracted once (batched, with a progress
  bar, cached on disk under ``cache_dir`` when ``cache_features``), and the head trains
  on those. Fast, for small data and quick comparisons; the features of all training
  images must fit in memory.

Inference (``inference.*``): each image's shorter side is resized to ``image_size *
scale`` for each scale in ``scales``; logits come from the whole image (``mode=resize``)
or from ``crop_size`` windows at ``stride``, averaged where they overlap (``mode=slide``,
mmseg's slide inference); optional horizontal-flip TTA. Softmax probabilities of every
scale/flip are resized (bilinear) to the ORIGINAL label resolution and averaged; the
argmax goes into :func:`dinov.metrics.confusion_matrix`, accumulated over the whole
validation set, then :func:`dinov.metrics.segmentation_metrics` (mIoU, aAcc, mAcc,
per-class IoU over ``num_classes``; classes absent from targets and predictions are NaN,
written as ``null``, and left out of the mIoU).

Outputs in ``output_dir``: ``config.yaml``, ``results.json``, ``metrics.jsonl`` (training
loss / lr), ``head.pt``, ``per_class_iou.png``, ``predictions.png`` (image | ground truth
| prediction with a fixed palette) and ``loss.png``.
"""

from __future__ import annotations

import colorsys
import json
import math
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov.config import ConfigError, ModelConfig
from dinov.data.datasets import ADE20KDataset
from dinov.metrics import confusion_matrix, segmentation_metrics
from eval.common import (
    build_eval_backbone,
    cache_key,
    extract,
    files_digest,
    resolve_model_config,
)
from eval.heads import (
    IMAGENET_MEAN,
    LinearBNSegHead,
    backbone_feature_map,
    seg_loss,
    upsample_logits,
)
from eval.pipeline import cli_main, prepare_output_dir, seed_all, write_run

FeatureFn = Callable[[Tensor], Tensor]  # (B, 3, H, W) in [0, 1] -> (B, C, h, w)


# ----------------------------------------------------------------------------- config


@dataclass
class SegDataConfig:
    """ADE20K layout under ``root`` (the folder holding ADEChallengeData2016, or it)."""

    root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    image_size: int = 512  # training crop; inference resizes the shorter side to it
    num_classes: int = 150
    ignore_index: int = 255
    num_workers: int = 4
    max_train_images: int | None = None  # first N (sorted) only: quick checks
    max_val_images: int | None = None


@dataclass
class SegHeadConfig:
    n_last_blocks: int = 1
    dropout: float = 0.0  # DINOv2's BNHead uses none


@dataclass
class SegTrainConfig:
    iterations: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    seed: int = 0
    augment: bool = True
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    log_every: int = 50


@dataclass
class SegInferenceConfig:
    mode: str = "slide"  # "resize" (whole image) or "slide" (windows)
    crop_size: int | None = None  # slide window; null = data.image_size
    stride: int = 341
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 8  # images (resize) or windows (slide) per backbone forward


@dataclass
class SegmentationEvalConfig:
    output_dir: str = "runs/eval_segmentation"
    device: str = "auto"  # auto = cuda when available
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    inference: SegInferenceConfig = field(default_factory=SegInferenceConfig)
    cache_features: bool = True  # train.augment=false only
    cache_dir: str | None = None  # null = <output_dir>/feature_cache
    num_vis: int = 4  # validation images drawn in predictions.png


def validate(cfg: SegmentationEvalConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    checks = [
        ("data.root", cfg.data.root is not None, "is required (the ADE20K dataset folder)"),
        ("inference.mode", cfg.inference.mode in ("resize", "slide"), "must be resize or slide"),
        ("inference.scales", bool(cfg.inference.scales) and min(cfg.inference.scales) > 0,
         "must be a non-empty list of positive ratios"),
        ("inference.stride", cfg.inference.stride >= 1, "must be >= 1"),
        ("inference.batch_size", cfg.inference.batch_size >= 1, "must be >= 1"),
        ("head.n_last_blocks", cfg.head.n_last_blocks >= 1, "must be >= 1"),
        ("train.iterations", cfg.train.iterations >= 0, "must be >= 0"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.ratio_range", len(cfg.train.ratio_range) == 2
         and 0 < cfg.train.ratio_range[0] <= cfg.train.ratio_range[1], "must be [low, high], 0 < low <= high"),
        ("data.image_size", cfg.data.image_size >= 1, "must be >= 1"),
        ("data.num_classes", 1 <= cfg.data.num_classes <= 255, "must be in [1, 255]"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")


# ----------------------------------------------------------------------------- data


def _resize_short(images: Tensor, short: int) -> Tensor:
    """(B, 3, H, W) with the shorter side resized to ``short`` (aspect kept, antialiased)."""
    h, w = images.shape[-2:]
    scale = short / min(h, w)
    size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _random_crop_box(label: Tensor, crop: int, cat_max_ratio: float, ignore_index: int,
                     gen: torch.Generator) -> tuple[int, int]:
    """mmseg RandomCrop: re-draw (up to 10 times) while one class dominates the crop."""
    h, w = label.shape
    box = (0, 0)
    for _ in range(10):
        box = (int(torch.randint(0, max(h - crop, 0) + 1, (), generator=gen)),
               int(torch.randint(0, max(w - crop, 0) + 1, (), generator=gen)))
        if cat_max_ratio >= 1.0:
            break
        part = label[box[0] : box[0] + crop, box[1] : box[1] + crop]
        counts = torch.bincount(part[part != ignore_index].flatten())
        counts = counts[counts > 0]
        if counts.numel() > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
    return box


def augment_pair(image: Tensor, label: Tensor, crop: int, ratio_range: Sequence[float],
                 cat_max_ratio: float, ignore_index: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """mmseg's ADE20K train transforms (rescale, crop, flip, pad) on one (image, label)."""
    ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * float(torch.rand((), generator=gen))
    image = _resize_short(image[None], max(1, round(crop * ratio)))[0]
    label = F.interpolate(label[None, None].float(), size=image.shape[-2:],
                          mode="nearest-exact")[0, 0].long()
    y, x = _random_crop_box(label, crop, cat_max_ratio, ignore_index, gen)
    image, label = image[:, y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]
    if float(torch.rand((), generator=gen)) < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    pad_h, pad_w = crop - image.shape[1], crop - image.shape[2]
    if pad_h or pad_w:
        # Pad with the mean colour: zero after normalisation, as mmseg pads normalised images.
        canvas = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, crop, crop).clone()
        canvas[:, : image.shape[1], : image.shape[2]] = image
        image = canvas
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


class AugmentedCrops(Dataset):
    """Item ``i`` is the ``i``-th training sample of the whole run (epochs concatenated).

    Epoch ``e`` visits the images in a permutation seeded by ``(seed, e)`` and sample
    ``i`` draws its augmentation from a generator seeded by ``(seed, i)``, so the stream
    is the same with any number of DataLoader workers.
    """

    def __init__(self, base: Dataset, length: int, crop: int, ratio_range: Sequence[float],
                 cat_max_ratio: float, ignore_index: int, seed: int) -> None:
        self.base, self.length, self.crop = base, length, crop
        self.ratio_range, self.cat_max_ratio = list(ratio_range), cat_max_ratio
        self.ignore_index, self.seed = ignore_index, seed
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self.length

    def _generator(self, *key: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, *key]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        epoch, position = divmod(i, len(self.base))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.base), generator=self._generator(0, epoch)))
        image, label = self.base[int(self._order[1][position])]
        return augment_pair(image, label, self.crop, self.ratio_range, self.cat_max_ratio,
                            self.ignore_index, self._generator(1, i))


# ----------------------------------------------------------------------------- training


def poly_lr(iteration: int, cfg: SegTrainConfig) -> float:
    """mmcv's poly schedule with linear warm-up (``warmup_ratio`` x lr at iteration 0)."""
    progress = iteration / max(cfg.iterations, 1)
    lr = (cfg.lr - cfg.min_lr) * (1.0 - progress) ** cfg.poly_power + cfg.min_lr
    if iteration < cfg.warmup_iters:
        lr *= 1.0 - (1.0 - iteration / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return lr


def cached_batches(features: Tensor, labels: Tensor, batch_size: int,
                   seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled mini-batches of cached (features, labels); full batches only."""
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield features[idx], labels[idx].long()


def augmented_batches(dataset: Dataset, feature_fn: FeatureFn, cfg: SegmentationEvalConfig,
                      device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Fresh augmented crops each batch, through the frozen backbone (no grad)."""
    tc = cfg.train
    crops = AugmentedCrops(dataset, tc.iterations * tc.batch_size, cfg.data.image_size,
                           tc.ratio_range, tc.cat_max_ratio, cfg.data.ignore_index, tc.seed)
    loader = DataLoader(crops, batch_size=tc.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    for images, labels in loader:
        with torch.no_grad():
            features = feature_fn(images.to(device, non_blocking=True))
        yield features, labels


def train_head(head: LinearBNSegHead, batches: Iterator[tuple[Tensor, Tensor]],
               cfg: SegTrainConfig, ignore_index: int, patch_size: int,
               log: Callable[[dict[str, float]], None]) -> float:
    """Train ``head`` for ``cfg.iterations`` steps of AdamW + poly lr; returns the last loss."""
    device = next(head.parameters()).device
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)
    head.train()
    loss_value = float("nan")
    for iteration in range(cfg.iterations):
        features, labels = next(batches)
        lr = poly_lr(iteration, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = head(features.to(device))
        loss = seg_loss(logits, labels.to(device), ignore_index, patch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if (iteration + 1) % max(cfg.log_every, 1) == 0 or iteration + 1 == cfg.iterations:
            log({"step": iteration + 1, "loss": loss_value, "lr": lr})
    head.eval()
    return loss_value


def train_cache_file(cfg: SegmentationEvalConfig, dataset: ADE20KDataset) -> pathlib.Path | None:
    """``cache_dir/seg_train_<key>.pt``; the key covers what the cached tensors depend on,
    every image and annotation file included."""
    if not cfg.cache_features:
        return None
    key = cache_key("seg-train-v1", resolve_model_config(cfg.model), cfg.model.weights,
                    str(pathlib.Path(str(cfg.data.root)).resolve()), cfg.data.train_split,
                    cfg.data.image_size, cfg.data.max_train_images, cfg.head.n_last_blocks,
                    files_digest(dataset.images + dataset.labels, dataset.root))
    cache_dir = pathlib.Path(cfg.cache_dir or pathlib.Path(cfg.output_dir) / "feature_cache")
    return cache_dir / f"seg_train_{key}.pt"


def cached_train_features(dataset: ADE20KDataset, feature_fn: FeatureFn,
                          cfg: SegmentationEvalConfig, device: torch.device) -> dict[str, Tensor]:
    """Patch features + labels of every (resized, centre-cropped) training image, cached."""
    cache_file = train_cache_file(cfg, dataset)
    loader = DataLoader(dataset, batch_size=cfg.inference.batch_size,
                        num_workers=cfg.data.num_workers)

    def fn(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        # uint8 labels: 0..254 classes and the 255 ignore index, 8x smaller than int64.
        return {"features": feature_fn(batch[0].to(device)), "labels": batch[1].to(torch.uint8)}

    return extract(loader, fn, desc="train features", total=len(loader), cache_file=cache_file)


# ----------------------------------------------------------------------------- inference


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg slide_inference window origins along one axis (the last one flush with the end)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


def _batched_logits(images: Tensor, feature_fn: FeatureFn, head: LinearBNSegHead,
                    patch_size: int, chunk: int) -> Tensor:
    """Pixel logits at the images' own size, ``chunk`` images per backbone forward."""
    parts = [head(feature_fn(part), part.shape[-2:], patch_size) for part in images.split(chunk)]
    return torch.cat(parts)


def slide_logits(images: Tensor, feature_fn: FeatureFn, head: LinearBNSegHead, patch_size: int,
                 crop: int, stride: int, chunk: int) -> Tensor:
    """Average of window logits where windows overlap, (B, K, H, W)."""
    batch, _, height, width = images.shape
    crop_h, crop_w = min(crop, height), min(crop, width)
    boxes = [(y, x) for y in window_starts(height, crop, stride)
             for x in window_starts(width, crop, stride)]
    windows = torch.stack([images[:, :, y : y + crop_h, x : x + crop_w] for y, x in boxes], 1)
    logits = _batched_logits(windows.flatten(0, 1), feature_fn, head, patch_size, chunk)
    logits = logits.unflatten(0, (batch, len(boxes)))
    total = images.new_zeros(batch, logits.shape[2], height, width)
    count = images.new_zeros(1, 1, height, width)
    for i, (y, x) in enumerate(boxes):  # a loop over windows, each a tensor op
        total[..., y : y + crop_h, x : x + crop_w] += logits[:, i]
        count[..., y : y + crop_h, x : x + crop_w] += 1
    return total / count


@torch.no_grad()
def predict_probs(images: Tensor, out_size: tuple[int, int], feature_fn: FeatureFn,
                  head: LinearBNSegHead, patch_size: int, base_size: int,
                  inference: SegInferenceConfig) -> Tensor:
    """Class probabilities (B, K, *out_size), averaged over scales and flips."""
    crop = inference.crop_size or base_size
    probs: Tensor | None = None
    runs = 0
    for scale in inference.scales:
        scaled = _resize_short(images, max(1, round(base_size * scale)))
        for flip in (False, True) if inference.flip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if inference.mode == "slide":
                logits = slide_logits(x, feature_fn, head, patch_size, crop, inference.stride,
                                      inference.batch_size)
            else:
                logits = _batched_logits(x, feature_fn, head, patch_size, inference.batch_size)
            logits = logits.flip(-1) if flip else logits
            logits = upsample_logits(logits, out_size)  # resize to the label resolution
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
            runs += 1
    assert probs is not None
    return probs / runs


def _same_size_groups(items: list[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Stack consecutive items whose images share a size (ADE20K sizes vary)."""
    start = 0
    for end in range(1, len(items) + 1):
        if end == len(items) or items[end][0].shape != items[start][0].shape:
            group = items[start:end]
            yield torch.stack([g[0] for g in group]), torch.stack([g[1] for g in group])
            start = end


def evaluate(dataset: Dataset, feature_fn: FeatureFn, head: LinearBNSegHead, patch_size: int,
             cfg: SegmentationEvalConfig, device: torch.device) -> tuple[Tensor, list[tuple]]:
    """Confusion matrix over ``dataset`` at label resolution, plus a few (image, gt, pred)."""
    k = cfg.data.num_classes
    conf = torch.zeros(k, k, dtype=torch.int64)
    examples: list[tuple[Tensor, Tensor, Tensor]] = []
    loader = DataLoader(dataset, batch_size=cfg.inference.batch_size,
                        num_workers=cfg.data.num_workers, collate_fn=list)
    head.eval()
    for items in tqdm(loader, desc="segmentation eval", disable=not sys.stderr.isatty()):
        for images, labels in _same_size_groups(items):
            probs = predict_probs(images.to(device), tuple(labels.shape[-2:]), feature_fn, head,
                                  patch_size, cfg.data.image_size, cfg.inference)
            pred = probs.argmax(dim=1).cpu()
            conf += confusion_matrix(pred, labels, k, cfg.data.ignore_index)
            for i in range(min(len(pred), cfg.num_vis - len(examples))):
                examples.append((images[i], labels[i], pred[i]))
    return conf, examples


# ----------------------------------------------------------------------------- plots


def palette(num_classes: int) -> np.ndarray:
    """Fixed colours (num_classes + 1, 3) uint8; the last row (black) is for ignored pixels."""
    colours = []
    for k in range(num_classes):
        # Golden-ratio hue steps keep neighbouring ids apart; three value levels add spread.
        hue = (k * 0.618033988749895) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, 0.65 + 0.35 * ((k // 3) % 2), 1.0 - 0.25 * (k % 3))
        colours.append([round(255 * c) for c in rgb])
    return np.array([*colours, [0, 0, 0]], dtype=np.uint8)


def colourise(label: Tensor, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids (anything out of range = ignore) -> (H, W, 3) uint8."""
    ids = label.long().numpy()
    ids = np.where((ids >= 0) & (ids < len(colours) - 1), ids, len(colours) - 1)
    return colours[ids]


def plot_per_class_iou(per_class: list[float], miou: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [k for k, v in enumerate(per_class) if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(per_class) + 2), 3.5))
    ax.bar(ids, [per_class[k] for k in ids], width=0.8, color="tab:blue")
    ax.axhline(miou, color="tab:red", linestyle="--", label=f"mIoU {miou:.2f}")
    ax.set_xlim(-1, len(per_class))
    ax.set_ylim(0, 100)
    ax.set_xlabel("class id")
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU (classes never seen nor predicted are left out)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_predictions(examples: list[tuple[Tensor, Tensor, Tensor]], num_classes: int,
                     path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = palette(num_classes)
    fig, axes = plt.subplots(len(examples), 3, figsize=(7.5, 2.5 * len(examples)), squeeze=False)
    for row, (image, label, pred) in zip(axes, examples, strict=True):
        panels = (image.permute(1, 2, 0).clamp(0, 1).numpy(), colourise(label, colours),
                  colourise(pred, colours))
        for ax, panel, title in zip(row, panels, ("image", "ground truth", "prediction"),
                                    strict=True):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _datasets(cfg: SegmentationEvalConfig) -> tuple[ADE20KDataset, ADE20KDataset]:
    """Train (full images, or resized + centre-cropped for cached features) and val sets.

    Opening them checks every annotation against ``data.num_classes``.
    """
    root = pathlib.Path(cfg.data.root or "")
    if not root.exists():
        raise FileNotFoundError(f"data.root: ADE20K dataset folder not found: {root}")
    train_size = None if cfg.train.augment else cfg.data.image_size
    data = cfg.data
    train = ADE20KDataset(root, data.train_split, image_size=train_size,
                          num_classes=data.num_classes, max_images=data.max_train_images)
    # Labels at full resolution for evaluation.
    val = ADE20KDataset(root, data.val_split, image_size=None, num_classes=data.num_classes,
                        max_images=data.max_val_images)
    return train, val


def _train_batches(train_set: ADE20KDataset, feature_fn: FeatureFn, cfg: SegmentationEvalConfig,
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    if cfg.train.augment:
        return augmented_batches(train_set, feature_fn, cfg, device)
    cached = cached_train_features(train_set, feature_fn, cfg, device)
    return cached_batches(cached["features"], cached["labels"], cfg.train.batch_size,
                          cfg.train.seed)


def _write_plots(out: pathlib.Path, metrics: Any, examples: list, num_classes: int) -> None:
    from dinov.plots import plot_curves

    plot_per_class_iou(metrics.per_class_iou, metrics.miou, out / "per_class_iou.png")
    if examples:
        plot_predictions(examples, num_classes, out / "predictions.png")
    plot_curves(out / "metrics.jsonl", out / "loss.png", ("loss", "lr"), "segmentation head")


def run(cfg: SegmentationEvalConfig) -> dict[str, Any]:
    """Train the head, evaluate, write every output; returns the results dict."""
    validate(cfg)
    out = prepare_output_dir(cfg.output_dir)
    seed_all(cfg.train.seed)
    train_set, val_set = _datasets(cfg)  # before the backbone: a bad root fails fast
    device = _device(cfg.device)
    backbone = build_eval_backbone(cfg.model, device)
    n_blocks = cfg.head.n_last_blocks

    def feature_fn(images: Tensor) -> Tensor:
        return backbone_feature_map(backbone, images, n_blocks)

    head = LinearBNSegHead(n_blocks * backbone.embed_dim, cfg.data.num_classes,
                           cfg.head.dropout).to(device)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    def log(row: dict[str, float]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"step {row['step']}: loss {row['loss']:.4f} lr {row['lr']:.2e}", file=sys.stderr)

    final_loss = float("nan")
    if cfg.train.iterations > 0:
        batches = _train_batches(train_set, feature_fn, cfg, device)
        final_loss = train_head(head, batches, cfg.train, cfg.data.ignore_index,
                                backbone.patch_size, log)
    torch.save({"head": head.state_dict(), "in_dim": head.in_dim,
                "num_classes": head.num_classes, "n_last_blocks": n_blocks}, out / "head.pt")
    conf, examples = evaluate(val_set, feature_fn, head, backbone.patch_size, cfg, device)
    metrics = segmentation_metrics(conf)
    results = {
        "miou": _json_float(metrics.miou), "aacc": _json_float(metrics.aacc),
        "macc": _json_float(metrics.macc),
        "per_class_iou": {str(k): _json_float(v) for k, v in enumerate(metrics.per_class_iou)},
        "num_images": len(val_set), "num_train_images": len(train_set),
        "num_classes": cfg.data.num_classes, "final_train_loss": _json_float(final_loss),
        "iterations": cfg.train.iterations,
    }
    write_run(out, cfg, results)
    _write_plots(out, metrics, examples, cfg.data.num_classes)
    return results


def report(results: dict[str, Any]) -> str:
    return json.dumps({k: results[k] for k in ("miou", "aacc", "macc", "num_images")})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "Linear + BN segmentation head on a frozen backbone (ADE20K mIoU).",
                    SegmentationEvalConfig, run, report)


if __name__ == "__main__":
    main()
