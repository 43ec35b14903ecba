"""NYUv2 monocular depth evaluation of a frozen backbone with a linear head (DINOv2 protocol).

``python -m eval.depth --config configs/eval/depth.yaml data.root=/datasets/nyu key=value ...``

The backbone comes from :func:`eval.common.build_eval_backbone` (a checkpoint of our
trainer, an official DINOv2/DINOv3 file, or a timm name plus local weights; ``null`` =
initialisation). This module owns the CLI's schema, data handling, the head's training
loop and the evaluation; the head and losses live in :mod:`eval.heads`.

Protocol (defaults = DINOv2 "lin. 4" / DINOv3 linear depth evaluation):

- **Data**: ``data.root`` holds the split files (lines ``rgb_path depth_path``, paths
  relative to ``data.root``; 16-bit PNG depth in millimetres, 0 = no measurement).
  Images enter the backbone at their native resolution (480x640 on NYUv2, zero-padded
  right/bottom to whole patches) unless ``data.image_size`` resizes the shorter side.
  Labels always stay at their native resolution: predictions are upsampled to them.
- **Features**: patch tokens of ``head.n_layers`` blocks (``even`` intervals as DINOv2's
  lin. 4, or the ``last`` ones) with each block's CLS token appended (``head.use_cls``).
- **Head**: 1x1 conv, x4 bilinear upsampling, 256 uniform bins with "linear"
  normalisation (``head.mode=bins``) or softplus regression; loss ``sigloss`` or ``l1``.
- **Training**: AdamW (lr 1e-4, wd 0.01, betas 0.9/0.999), gradient clipping at 35,
  38,400 iterations at batch 16 (DINOv3's schedule), linear warm-up then cosine decay,
  random horizontal flips (``train.flip``). ``train.precompute=true`` extracts train
  features once (fast, cacheable in ``data.cache_dir``; memory: images x (1 + flip) x
  L*D x h x w values), ``false`` runs the frozen backbone on every batch (needed for the
  24k-image BTS train split).
- **Evaluation**: predictions bilinearly resized to the label resolution, optional flip
  test-time augmentation, metrics of :func:`dinov.metrics.depth_errors` per image on
  pixels with ``min_depth < gt < max_depth`` inside the Eigen crop (``eval.eigen_crop``),
  averaged over images.

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``results.json`` (rmse, abs_rel,
log10, rmse_log, sq_rel, d1/d2/d3 in percent, image counts, and the same metrics for the
constant train-mean-depth predictor), ``metrics.jsonl`` and ``loss.png`` (training
curve), ``predictions.png`` (test image | ground truth | prediction per row, one colour
scale per row) and ``head.pt`` (the trained head).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from dinov.config import ConfigError, ModelConfig, check_choice
from dinov.data.datasets import NYUDepthDataset, eigen_crop_mask
from dinov.metrics import DEPTH_METRIC_NAMES, depth_errors, summarize_depth
from dinov.models import Backbone
from eval.common import (
    build_eval_backbone,
    cache_key,
    extract,
    files_digest,
)
from eval.heads import (
    BIN_NORMS,
    HEAD_MODES,
    LAYER_SETS,
    LOSSES,
    LinearDepthHead,
    depth_loss,
    layer_indices,
    multilayer_features,
    normalize,
    valid_depth_mask,
)
from eval.pipeline import cli_main, prepare_output_dir, seed_all, write_run

log = logging.getLogger("eval.depth")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------ schema


@dataclass
class DepthDataConfig:
    """NYUv2 split files under ``root``; ``image_size``: null = native input resolution."""

    root: str | None = None
    train_split: str = "nyu_train.txt"
    test_split: str = "nyu_test.txt"
    image_size: int | None = None
    min_depth: float = 1e-3
    max_depth: float = 10.0
    batch_size: int = 8
    num_workers: int = 4
    cache_dir: str | None = None
    cache_dtype: str = "float16"


@dataclass
class DepthHeadConfig:
    """Which features feed the linear head and how it decodes depth (DINOv2 lin. 4)."""

    mode: str = "bins"
    n_bins: int = 256
    bin_norm: str = "linear"
    n_layers: int = 4
    layer_set: str = "even"
    use_cls: bool = True
    backbone_norm: bool = True
    batch_norm: bool = False
    upsample: int = 4


@dataclass
class DepthLossConfig:
    """``sigloss`` (``variance_focus`` = lambda) or ``l1``; SigLoss warm-up iterations."""

    name: str = "sigloss"
    variance_focus: float = 0.85
    warmup_iters: int = 0


@dataclass
class DepthTrainConfig:
    """Head optimisation (DINOv3's linear-depth recipe: 38,400 iterations at batch 16)."""

    iterations: int = 38400
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_iters: int = 1920
    grad_clip: float = 35.0
    flip: bool = True
    precompute: bool = False
    log_every: int = 100


@dataclass
class DepthEvalOptions:
    """Evaluation switches and the number of test images drawn in predictions.png."""

    eigen_crop: bool = True
    flip_tta: bool = True
    num_plot: int = 4


@dataclass
class DepthEvalConfig:
    """A depth evaluation run."""

    output_dir: str = "runs/eval_depth"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DepthDataConfig = field(default_factory=DepthDataConfig)
    head: DepthHeadConfig = field(default_factory=DepthHeadConfig)
    loss: DepthLossConfig = field(default_factory=DepthLossConfig)
    train: DepthTrainConfig = field(default_factory=DepthTrainConfig)
    eval: DepthEvalOptions = field(default_factory=DepthEvalOptions)


def validate(cfg: DepthEvalConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    if cfg.data.root is None:
        raise ConfigError("config key 'data.root' is required: the folder with the split files")
    check_choice("head.mode", cfg.head.mode, HEAD_MODES)
    check_choice("head.bin_norm", cfg.head.bin_norm, BIN_NORMS)
    check_choice("head.layer_set", cfg.head.layer_set, LAYER_SETS)
    check_choice("loss.name", cfg.loss.name, LOSSES)
    check_choice("data.cache_dtype", cfg.data.cache_dtype, tuple(CACHE_DTYPES))
    if not 0 < cfg.data.min_depth < cfg.data.max_depth:
        raise ConfigError("config keys 'data.min_depth' < 'data.max_depth' must both be > 0")
    minimums = {
        "data.batch_size": (cfg.data.batch_size, 1), "data.num_workers": (cfg.data.num_workers, 0),
        "head.n_layers": (cfg.head.n_layers, 1), "head.n_bins": (cfg.head.n_bins, 2),
        "head.upsample": (cfg.head.upsample, 1), "train.iterations": (cfg.train.iterations, 0),
        "train.batch_size": (cfg.train.batch_size, 1), "train.warmup_iters": (cfg.train.warmup_iters, 0),
        "train.log_every": (cfg.train.log_every, 1), "eval.num_plot": (cfg.eval.num_plot, 0),
    }  # fmt: skip
    for key, (value, minimum) in minimums.items():
        if value < minimum:
            raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value}")
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise ConfigError("config key 'data.image_size' must be null or >= 1")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {cfg.train.lr}")
    if not 0.0 <= cfg.loss.variance_focus <= 1.0:
        raise ConfigError("config key 'loss.variance_focus' must be in [0, 1]")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------ data


def split_file(data: DepthDataConfig, which: str) -> pathlib.Path:
    """The ``data.train_split`` / ``data.test_split`` file, checked to exist."""
    name = getattr(data, which)
    root = pathlib.Path(str(data.root)).expanduser()
    path = pathlib.Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(
            f"data.{which}: NYUv2 split file not found: {path} "
            f"(expected lines 'rgb_path depth_path', paths relative to data.root={root})"
        )
    return path


def open_split(data: DepthDataConfig, which: str) -> NYUDepthDataset:
    path = split_file(data, which)
    return NYUDepthDataset(path, root=pathlib.Path(str(data.root)).expanduser(),
                           image_size=None, max_depth=data.max_depth)


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack (image, depth) pairs; a split must hold one image size (as NYUv2 does)."""
    sizes = {tuple(image.shape[-2:]) for image, _ in batch}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch differ in size {sorted(sizes)}: a split must "
                         "hold images of one size (NYUv2: 480x640)")
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def input_size(hw: tuple[int, int], image_size: int | None) -> tuple[int, int]:
    """Backbone input size: native, or the shorter side resized to ``image_size``."""
    if image_size is None:
        return hw
    scale = image_size / min(hw)
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


# ------------------------------------------------------------------------ features


class FeatureExtractor:
    """Images in [0, 1] -> the head's inputs ``(patch map, cls | None)`` on ``device``."""

    def __init__(self, backbone: Backbone, cfg: DepthEvalConfig, device: torch.device):
        self.backbone, self.device = backbone, device
        self.image_size, self.use_cls = cfg.data.image_size, cfg.head.use_cls
        self.norm = cfg.head.backbone_norm
        try:
            self.blocks = layer_indices(backbone.num_blocks, cfg.head.n_layers, cfg.head.layer_set)
        except ValueError as error:
            raise ValueError(f"head.n_layers/head.layer_set: {error}") from None

    @property
    def in_dim(self) -> int:
        return len(self.blocks) * self.backbone.embed_dim * (2 if self.use_cls else 1)

    def input_hw(self, images: Tensor) -> tuple[int, int]:
        return input_size(tuple(images.shape[-2:]), self.image_size)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = images.to(self.device, non_blocking=True).float()
        hw = self.input_hw(x)
        if hw != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
        feats, cls = multilayer_features(self.backbone, normalize(x), self.blocks, self.norm)
        return feats, (cls if self.use_cls else None)


def _loader(dataset: Dataset, cfg: DepthEvalConfig, **kwargs: Any) -> DataLoader:
    # More decoding workers than cores only adds contention (and a DataLoader warning).
    workers = min(cfg.data.num_workers, os.cpu_count() or 1)
    return DataLoader(dataset, batch_size=kwargs.pop("batch_size", cfg.data.batch_size),
                      num_workers=workers, collate_fn=collate, **kwargs)


def train_cache_file(cfg: DepthEvalConfig, dataset: NYUDepthDataset) -> pathlib.Path | None:
    """``cache_dir/nyu_train_<key>.pt``; the key covers what the cached tensors depend on,
    every rgb and depth file included."""
    if cfg.data.cache_dir is None:
        return None
    files = [path for pair in dataset.pairs for path in pair]
    key = cache_key(
        "depth-train-v1", cfg.model, cfg.model.weights, str(split_file(cfg.data, "train_split")),
        len(dataset), files_digest(files, dataset.root), cfg.data.image_size, cfg.data.max_depth,
        cfg.data.cache_dtype,
        {k: getattr(cfg.head, k) for k in ("n_layers", "layer_set", "use_cls", "backbone_norm")},
        cfg.train.flip,
    )
    return pathlib.Path(cfg.data.cache_dir).expanduser() / f"nyu_train_{key}.pt"


def precompute_train(extractor: FeatureExtractor, dataset: NYUDepthDataset,
                     cfg: DepthEvalConfig) -> dict[str, Tensor]:
    """Train features (and those of flipped images with ``train.flip``), depths and sizes."""
    dtype = CACHE_DTYPES[cfg.data.cache_dtype]

    def run(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, depth = batch
        out: dict[str, Tensor] = {"depth": depth}
        views = {"": images, "flip_": images.flip(-1)} if cfg.train.flip else {"": images}
        for tag, view in views.items():
            feats, cls = extractor(view)
            out[f"{tag}feats"] = feats.to(dtype)
            if cls is not None:
                out[f"{tag}cls"] = cls.to(dtype)
        out["input_hw"] = torch.tensor([extractor.input_hw(images)] * len(images))
        return out

    loader = _loader(dataset, cfg)
    return extract(loader, run, desc="train features", total=len(loader),
                   cache_file=train_cache_file(cfg, dataset))


# ------------------------------------------------------------------------ train batches


@dataclass
class Batch:
    feats: Tensor
    cls: Tensor | None
    depth: Tensor
    input_hw: tuple[int, int]


class CachedBatches:
    """Random batches from precomputed features; flipped copies count as extra samples."""

    def __init__(self, pool: dict[str, Tensor], device: torch.device, seed: int):
        flip = "flip_feats" in pool
        self.feats = torch.cat([pool["feats"], pool["flip_feats"]]) if flip else pool["feats"]
        cls = pool.get("cls")
        if cls is not None and flip:
            cls = torch.cat([cls, pool["flip_cls"]])
        self.cls = cls
        self.depth = torch.cat([pool["depth"], pool["depth"].flip(-1)]) if flip else pool["depth"]
        self.input_hw = tuple(int(v) for v in pool["input_hw"][0])
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def mean_depth(self, min_depth: float, max_depth: float) -> float:
        return float(self.depth[valid_depth_mask(self.depth, min_depth, max_depth)].double().mean())

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(len(self.feats), (batch_size,), generator=self.generator)
        cls = None if self.cls is None else self.cls[idx].to(self.device).float()
        return Batch(self.feats[idx].to(self.device).float(), cls,
                     self.depth[idx].to(self.device), self.input_hw)


class OnlineBatches:
    """Random batches through the frozen backbone, each image flipped with p = 0.5."""

    def __init__(self, extractor: FeatureExtractor, dataset: NYUDepthDataset,
                 cfg: DepthEvalConfig, device: torch.device):
        self.extractor, self.device, self.flip = extractor, device, cfg.train.flip
        # Separate streams: the sampler runs ahead of the flips when workers prefetch.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.Generator().manual_seed(cfg.seed + 1)
        sampler = RandomSampler(dataset, replacement=True, generator=order,
                                num_samples=max(1, cfg.train.iterations) * cfg.train.batch_size)
        self.iterator: Iterator = iter(_loader(dataset, cfg, sampler=sampler, drop_last=True,
                                               batch_size=cfg.train.batch_size))
        self.depth_sum, self.depth_count = 0.0, 0
        self.min_depth, self.max_depth = cfg.data.min_depth, cfg.data.max_depth

    def mean_depth(self, min_depth: float, max_depth: float) -> float:
        """Mean valid depth of the batches drawn so far (NaN before the first)."""
        return self.depth_sum / self.depth_count if self.depth_count else float("nan")

    def sample(self, batch_size: int) -> Batch:
        images, depth = next(self.iterator)
        if self.flip:
            flip = torch.rand(len(images), generator=self.generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            depth = torch.where(flip[:, None, None], depth.flip(-1), depth)
        valid = valid_depth_mask(depth, self.min_depth, self.max_depth)
        self.depth_sum += float(depth[valid].double().sum())
        self.depth_count += int(valid.sum())
        feats, cls = self.extractor(images)
        return Batch(feats, cls, depth.to(self.device), self.extractor.input_hw(images))


# ------------------------------------------------------------------------ head training


def lr_at(step: int, cfg: DepthTrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_iters``, then cosine decay to 0."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.iterations - cfg.warmup_iters)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(head: LinearDepthHead, cfg: DepthTrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm parameters (1-d tensors)."""
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def train_step(head: LinearDepthHead, batch: Batch, cfg: DepthEvalConfig, patch: int,
               warm_up: bool) -> Tensor:
    """Loss of one batch at label resolution (DINOv2 resizes predictions to the labels)."""
    out_size = tuple(batch.depth.shape[-2:])
    pred = head.predict(batch.feats, batch.cls, patch, batch.input_hw, out_size)
    valid = valid_depth_mask(batch.depth, cfg.data.min_depth, cfg.data.max_depth)
    return depth_loss(cfg.loss.name, pred, batch.depth, valid, warm_up=warm_up,
                      variance_focus=cfg.loss.variance_focus)


def train_head(head: LinearDepthHead, batches: CachedBatches | OnlineBatches,
               cfg: DepthEvalConfig, patch: int) -> list[dict[str, float]]:
    """Optimise the head for ``train.iterations``; returns the logged rows.

    Each row's ``loss`` is the mean over the iterations since the previous row, so the
    curve is not dominated by the noise of single small batches.
    """
    tcfg, rows = cfg.train, []
    optimizer = make_optimizer(head, tcfg)
    head.train()
    window: list[Tensor] = []
    bar = tqdm(range(tcfg.iterations), desc="depth head", disable=not sys.stderr.isatty())
    for step in bar:
        lr = lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(head, batches.sample(tcfg.batch_size), cfg, patch,
                          warm_up=step < cfg.loss.warmup_iters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), tcfg.grad_clip)
        optimizer.step()
        window.append(loss.detach())
        if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.iterations:
            rows.append({"step": step + 1, "loss": float(torch.stack(window).mean()), "lr": lr})
            window.clear()
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
            if bar.disable:
                log.info("iter %d/%d loss %.4f lr %.3g", step + 1, tcfg.iterations,
                         rows[-1]["loss"], lr)
    head.eval()
    return rows


# ------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_batch(head: LinearDepthHead, extractor: FeatureExtractor, images: Tensor,
                  out_size: tuple[int, int], flip_tta: bool) -> Tensor:
    """Depth at label resolution; with ``flip_tta`` averaged with the flipped image's."""
    patch, hw = extractor.backbone.patch_size, extractor.input_hw(images)
    pred = head.predict(*extractor(images), patch, hw, out_size)
    if flip_tta:
        flipped = head.predict(*extractor(images.flip(-1)), patch, hw, out_size)
        pred = 0.5 * (pred + flipped.flip(-1))
    return pred


def eval_mask(depth: Tensor, eigen_crop: bool) -> Tensor | None:
    """Eigen crop (scaled from 480x640 to the label size) broadcast over the batch."""
    if not eigen_crop:
        return None
    return eigen_crop_mask(*depth.shape[-2:]).to(depth.device).expand_as(depth)


def score(pred: Tensor, depth: Tensor, cfg: DepthEvalConfig) -> dict[str, Tensor]:
    """Per-image errors on valid pixels (within the Eigen crop when enabled)."""
    return depth_errors(pred, depth, eval_mask(depth, cfg.eval.eigen_crop),
                        cfg.data.min_depth, cfg.data.max_depth)


def evaluate(head: LinearDepthHead, extractor: FeatureExtractor, dataset: NYUDepthDataset,
             cfg: DepthEvalConfig, mean_depth: float,
             ) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor, Tensor]]]:
    """Stream the test split; returns results and the first images/labels/predictions."""
    per_image: dict[str, list[Tensor]] = {}
    baseline: dict[str, list[Tensor]] = {}
    shown: list[tuple[Tensor, Tensor, Tensor]] = []
    loader = _loader(dataset, cfg)
    for images, depth in tqdm(loader, desc="test", disable=not sys.stderr.isatty()):
        depth = depth.to(extractor.device)
        pred = predict_batch(head, extractor, images, tuple(depth.shape[-2:]), cfg.eval.flip_tta)
        for key, value in score(pred, depth, cfg).items():
            per_image.setdefault(key, []).append(value.cpu())
        for key, value in score(torch.full_like(depth, mean_depth), depth, cfg).items():
            baseline.setdefault(key, []).append(value.cpu())
        if len(shown) < cfg.eval.num_plot:
            take = cfg.eval.num_plot - len(shown)
            shown += zip(images[:take], depth[:take].cpu(), pred[:take].cpu(), strict=True)
    errors = {key: torch.cat(values) for key, values in per_image.items()}
    results: dict[str, Any] = summarize_depth(errors)
    results["num_images"] = len(dataset)
    results["num_images_scored"] = int((~errors["rmse"].isnan()).sum())
    results["baseline_train_mean"] = {
        "depth": mean_depth,
        **summarize_depth({k: torch.cat(v) for k, v in baseline.items()}),
    }
    return results, shown


# ------------------------------------------------------------------------ outputs


def plot_predictions(shown: list[tuple[Tensor, Tensor, Tensor]], path: pathlib.Path,
                     cfg: DepthEvalConfig) -> pathlib.Path | None:
    """One row per test image: image | ground truth | prediction, one colour scale per row.

    The scale spans the row's valid ground truth; pixels without a label are blank.
    """
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 2.6 * len(shown)), squeeze=False)
    for row, (image, depth, pred) in zip(axes, shown, strict=True):
        valid = valid_depth_mask(depth, cfg.data.min_depth, cfg.data.max_depth)
        lo, hi = (float(depth[valid].min()), float(depth[valid].max())) if valid.any() else (
            cfg.data.min_depth, cfg.data.max_depth)
        rmse = float(score(pred[None], depth[None], cfg)["rmse"][0])
        row[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        row[1].imshow(torch.where(valid, depth, torch.nan).numpy(), cmap="magma_r",
                      vmin=lo, vmax=hi)
        shown_pred = row[2].imshow(pred.numpy(), cmap="magma_r", vmin=lo, vmax=hi)
        for ax, title in zip(row, ("image", "ground truth", f"prediction (RMSE {rmse:.3f} m)"),
                             strict=True):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.colorbar(shown_pred, ax=row.tolist(), fraction=0.025, label="depth (m)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(cfg: DepthEvalConfig, results: dict[str, Any], rows: list[dict[str, float]],
                  head: LinearDepthHead, shown: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """config.yaml, results.json, metrics.jsonl, loss.png, predictions.png and head.pt."""
    from dinov.plots import plot_curves

    out = pathlib.Path(cfg.output_dir)
    write_run(out, cfg, results)
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    plot_curves(out / "metrics.jsonl", out / "loss.png", ("loss",), "depth head training loss")
    plot_predictions(shown, out / "predictions.png", cfg)
    torch.save({"head": head.state_dict(), "in_dim": head.in_dim, "mode": head.mode},
               out / "head.pt")


def backbone_summary(backbone: Backbone, model: ModelConfig) -> dict[str, Any]:
    """What was evaluated; for our checkpoints the architecture comes from the file."""
    return {
        "arch": getattr(backbone.model, "pretrained_cfg", {}).get("architecture", model.arch),
        "embed_dim": backbone.embed_dim, "num_blocks": backbone.num_blocks,
        "patch_size": backbone.patch_size, "weights": model.weights,
        "weights_key": model.weights_key if model.weights else None,
    }  # fmt: skip


def build_head(cfg: DepthEvalConfig, in_dim: int, device: torch.device) -> LinearDepthHead:
    return LinearDepthHead(
        in_dim, mode=cfg.head.mode, n_bins=cfg.head.n_bins, min_depth=cfg.data.min_depth,
        max_depth=cfg.data.max_depth, upsample=cfg.head.upsample,
        batch_norm=cfg.head.batch_norm, bin_norm=cfg.head.bin_norm,
    ).to(device)


def run(cfg: DepthEvalConfig) -> dict[str, Any]:
    """The whole evaluation: features, head training, test metrics; writes the outputs."""
    validate(cfg)
    prepare_output_dir(cfg.output_dir)
    seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, test_set = open_split(cfg.data, "train_split"), open_split(cfg.data, "test_split")
    extractor = FeatureExtractor(build_eval_backbone(cfg.model, device), cfg, device)
    start = time.perf_counter()
    if cfg.train.precompute:
        batches: CachedBatches | OnlineBatches = CachedBatches(
            precompute_train(extractor, train_set, cfg), device, cfg.seed)
    else:
        batches = OnlineBatches(extractor, train_set, cfg, device)
    torch.manual_seed(cfg.seed)  # the head's init does not depend on how features were made
    head = build_head(cfg, extractor.in_dim, device)
    rows = train_head(head, batches, cfg, extractor.backbone.patch_size)
    train_seconds = time.perf_counter() - start
    mean_depth = batches.mean_depth(cfg.data.min_depth, cfg.data.max_depth)
    results, shown = evaluate(head, extractor, test_set, cfg, mean_depth)
    results.update({
        "backbone": backbone_summary(extractor.backbone, cfg.model),
        "num_train_images": len(train_set),
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "blocks": extractor.blocks,
        "feature_dim": extractor.in_dim,
        "eigen_crop": cfg.eval.eigen_crop,
        "flip_tta": cfg.eval.flip_tta,
        "train_seconds": round(train_seconds, 2),
    })
    write_outputs(cfg, results, rows, head, shown)
    return results


def report(results: dict[str, Any]) -> str:
    summary = ", ".join(f"{k} {results[k]:.4f}" for k in DEPTH_METRIC_NAMES)
    return (f"depth ({results['num_images']} test images): {summary}\n"
            f"train-mean baseline: rmse {results['baseline_train_mean']['rmse']:.4f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "NYUv2 depth evaluation of a frozen backbone (linear head).",
                    DepthEvalConfig, run, report)


if __name__ == "__main__":
    from dinov.cli import setup_logging

    setup_logging()
    main()
