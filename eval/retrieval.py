"""Revisited Oxford / Paris image retrieval with a frozen backbone (``python -m eval.retrieval``).

``python -m eval.retrieval --config configs/eval/retrieval.yaml key=value ...`` evaluates a
backbone from any source :mod:`eval.common` accepts (our trainer's checkpoint, an official
DINOv2/DINOv3 file, a timm state dict, or ``model.weights=null`` for the architecture at
initialisation) on ``roxford5k`` or ``rparis6k`` in the revisitop layout
(``root/jpg/*.jpg`` + ``root/gnd_<dataset>.pkl``, or ``root/<dataset>/...``).

Protocol (Radenovic et al., 2018, "Revisiting Oxford and Paris"):

- queries are cropped to their ``bbx`` before anything else; database images are whole;
- every image is then shrunk so its longer side is ``data.image_size`` (PIL ``thumbnail``
  semantics as in revisitop/cirtorch and DINO's retrieval eval: images already smaller
  are kept unless ``data.upscale``). Sizes need not be multiples of the patch: the
  backbone zero-pads the normalised image on the right/bottom to the next multiple
  (timm ``dynamic_img_pad``), so no patch is pure padding;
- global descriptor: the CLS token (``features.pooling=cls``, as DINO/DINOv2 report) or
  GeM over the patch tokens (``gem``, ``features.gem_p=3`` as Radenovic et al.);
- multi-scale (``features.multiscale``): the resized image is rescaled by each factor
  (default ``[1, 1/sqrt 2, sqrt 2]``, the cirtorch/revisitop multi-scale protocol), each
  scale's descriptor is L2-normalised, the descriptors are averaged and L2-normalised
  again. ``[1.0]`` is single-scale. DINO's own variant is ``image_size=224`` with
  ``[1, 0.707, 0.5]``;
- ranking by cosine similarity; mAP for Easy, Medium and Hard and mP@k, exactly as
  :func:`dinov.metrics.revisited_map` (junk removed from the ranking, queries without
  positives under a protocol left out of its mean).

Default full-scale setting (``configs/eval/retrieval.yaml``): longer side 512, CLS,
three scales. Features are extracted in batches of equally-sized images (images are
bucketed by their resized shape, so variable sizes still batch), with a tqdm bar on a
terminal, and cached on disk keyed by everything they depend on.

Outputs in ``output_dir``: ``config.yaml``, ``results.json`` and ``retrieval_topk.png``
(a few queries, each followed by its top-k database images framed green/red/gray for
positive/negative/junk under the Medium protocol).
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov.config import ConfigError, ModelConfig
from dinov.data.datasets import RevisitedRetrievalDataset
from dinov.metrics import RetrievalMetrics, revisited_map, similarity_ranks
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
from eval.pipeline import cli_main, prepare_output_dir, seed_all, write_run

POOLINGS = ("cls", "gem")
PRECISIONS = ("fp32", "bf16")
SPLITS = ("query", "database")
# Bump when the way features are computed changes, so stale caches are not reused.
_CACHE_VERSION = 1
# Frame colours of the top-k grid (RGB in [0, 1]) under the Medium protocol.
_FRAME = {"query": (0.2, 0.4, 1.0), "positive": (0.1, 0.75, 0.1),
          "negative": (0.9, 0.1, 0.1), "junk": (0.6, 0.6, 0.6)}


# ------------------------------------------------------------------------------ config
@dataclass
class RetrievalDataConfig:
    """Where the revisitop layout lives and how images are sized and batched."""

    root: str = "data/revisitop"
    dataset: str = "roxford5k"  # roxford5k | rparis6k
    image_size: int = 512  # longer side after resizing (queries: of the bbx crop)
    upscale: bool = False  # False: PIL-thumbnail semantics, smaller images stay as they are
    batch_size: int = 16  # images per forward; a batch only mixes images of one shape
    num_workers: int = 4


@dataclass
class RetrievalFeaturesConfig:
    """How a global descriptor is made from the backbone output."""

    pooling: str = "cls"  # cls | gem (over patch tokens)
    gem_p: float = 3.0
    multiscale: list[float] = field(default_factory=lambda: [1.0, 1 / math.sqrt(2), math.sqrt(2)])
    cache_features: bool = True
    cache_dir: str | None = None  # default: <output_dir>/feature_cache


@dataclass
class RetrievalPlotConfig:
    num_queries: int = 6  # queries shown, evenly spaced over the query list (0: no PNG)
    topk: int = 8
    thumb_size: int = 96  # longer side of each thumbnail


@dataclass
class RetrievalConfig:
    """A retrieval evaluation run."""

    output_dir: str = "runs/eval/retrieval"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    features: RetrievalFeaturesConfig = field(default_factory=RetrievalFeaturesConfig)
    plot: RetrievalPlotConfig = field(default_factory=RetrievalPlotConfig)
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    seed: int = 0


def validate(cfg: RetrievalConfig) -> None:
    """Raise ConfigError naming the first key with a value the pipeline cannot use."""
    checks = [
        ("data.dataset", cfg.data.dataset in ("roxford5k", "rparis6k"), "roxford5k or rparis6k"),
        ("data.image_size", cfg.data.image_size > 0, "a positive integer"),
        ("data.batch_size", cfg.data.batch_size >= 1, "an integer >= 1"),
        ("data.num_workers", cfg.data.num_workers >= 0, "an integer >= 0"),
        ("features.pooling", cfg.features.pooling in POOLINGS, f"one of {list(POOLINGS)}"),
        ("features.gem_p", cfg.features.gem_p > 0, "a positive number"),
        ("features.multiscale", bool(cfg.features.multiscale)
         and all(s > 0 for s in cfg.features.multiscale), "a non-empty list of positive scales"),
        ("ks", bool(cfg.ks) and all(k >= 1 for k in cfg.ks), "a non-empty list of integers >= 1"),
        ("precision", cfg.precision in PRECISIONS, f"one of {list(PRECISIONS)}"),
        ("plot.topk", cfg.plot.topk >= 1, "an integer >= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {expected}")


# ------------------------------------------------------------------------------ images
def shrink_shape(height: int, width: int, size: int, upscale: bool = False) -> tuple[int, int]:
    """Shape with the longer side ``size`` (aspect kept); never larger unless ``upscale``."""
    longer = max(height, width)
    if longer <= size and not upscale:
        return height, width
    return max(1, round(height * size / longer)), max(1, round(width * size / longer))


def resize_image(image: Tensor, shape: tuple[int, int]) -> Tensor:
    """(3, H, W) -> (3, *shape), antialiased bilinear (a no-op at the same shape)."""
    if tuple(image.shape[-2:]) == tuple(shape):
        return image
    return F.interpolate(image[None], size=shape, mode="bilinear", align_corners=False,
                         antialias=True)[0]


class RetrievalImages(Dataset):
    """One split of a revisited dataset as ``(index, image)``: query crops or database images.

    Images are in [0, 1], cropped (queries) and then resized as the module docstring says.
    """

    def __init__(self, dataset: RevisitedRetrievalDataset, split: str, image_size: int,
                 upscale: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if dataset.image_size is not None:
            raise ValueError("pass a RevisitedRetrievalDataset built with image_size=None")
        self.dataset, self.split = dataset, split
        self.image_size, self.upscale = image_size, upscale

    def __len__(self) -> int:
        return len(self.dataset.qimlist if self.split == "query" else self.dataset.imlist)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        if self.split == "query":
            image = self.dataset.query_image(index, crop=True)
        else:
            image = self.dataset.database_image(index)
        shape = shrink_shape(*image.shape[-2:], self.image_size, self.upscale)
        return index, resize_image(image, shape)

    def estimated_shape(self, index: int) -> tuple[int, int]:
        """The resized shape, from the file header (and ``bbx``) without decoding pixels."""
        names = self.dataset.qimlist if self.split == "query" else self.dataset.imlist
        with Image.open(self.dataset.image_path(names[index])) as img:
            width, height = img.size
        if self.split == "query":
            x1, y1, x2, y2 = (round(float(v)) for v in self.dataset.gnd[index]["bbx"])
            width = max(1, min(x2, width) - max(x1, 0))
            height = max(1, min(y2, height) - max(y1, 0))
        return shrink_shape(height, width, self.image_size, self.upscale)


def shape_buckets(images: RetrievalImages, batch_size: int) -> list[list[int]]:
    """Batches of indices whose images share (by their headers) one resized shape."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index in range(len(images)):
        by_shape.setdefault(images.estimated_shape(index), []).append(index)
    return [indices[start : start + batch_size]
            for _, indices in sorted(by_shape.items())
            for start in range(0, len(indices), batch_size)]


def _collate(items: list[tuple[int, Tensor]]) -> list[tuple[int, Tensor]]:
    # Shapes may still differ (an estimate can be off); the feature function groups them.
    return items


# ------------------------------------------------------------------------------ features
def gem(tokens: Tensor, p: float = 3.0) -> Tensor:
    """Generalised mean over tokens, (B, N, D) -> (B, D).

    Radenovic's GeM clamps activations at a small epsilon because CNN maps are
    non-negative. ViT tokens after the final LayerNorm are signed, and clamping would
    zero about half the channels, so this is the signed power mean
    ``sign(m) |m|^(1/p)`` with ``m = mean(sign(x) |x|^p)``: identical to GeM on
    non-negative inputs, and exactly average pooling at ``p = 1``.
    """
    if p <= 0:
        raise ValueError(f"GeM needs p > 0, got {p}")
    if p == 1:
        return tokens.mean(dim=1)
    powered = tokens.sign() * tokens.abs().pow(p)
    mean = powered.mean(dim=1)
    return mean.sign() * mean.abs().pow(1.0 / p)


def pool(output: Any, pooling: str, gem_p: float) -> Tensor:
    """A (B, D) descriptor from a :class:`~dinov.models.BackboneOutput`."""
    if pooling == "cls":
        return output.cls
    if pooling == "gem":
        return gem(output.patch.float(), gem_p)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def multiscale_descriptor(backbone: Backbone, images: Tensor, scales: Sequence[float],
                          pooling: str, gem_p: float) -> Tensor:
    """Average of the L2-normalised descriptors of ``images`` (B, 3, H, W) at each scale."""
    total = None
    for scale in scales:
        scaled = images
        if scale != 1.0:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear",
                                   align_corners=False, antialias=scale < 1.0)
        vec = F.normalize(pool(backbone(scaled), pooling, gem_p).float(), dim=-1)
        total = vec if total is None else total + vec
    assert total is not None
    return F.normalize(total / len(scales), dim=-1)


Batch = list[tuple[int, Tensor]]


def _describe_batch_fn(cfg: RetrievalConfig, get_backbone: Callable[[], Backbone],
                       device: torch.device) -> Callable[[Batch], dict[str, Tensor]]:
    """The per-batch function for :func:`eval.common.extract`: index + descriptor per image."""
    autocast = cfg.precision == "bf16" and device.type == "cuda"

    def describe(items: Batch) -> dict[str, Tensor]:
        backbone = get_backbone()
        groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        for index, image in items:
            groups.setdefault(tuple(image.shape), []).append((index, image))
        indices, vectors = [], []
        for group in groups.values():
            batch = normalize(torch.stack([image for _, image in group]).to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                vectors.append(multiscale_descriptor(
                    backbone, batch, cfg.features.multiscale, cfg.features.pooling,
                    cfg.features.gem_p))
            indices.append(torch.tensor([index for index, _ in group]))
        return {"index": torch.cat(indices), "features": torch.cat(vectors).float()}

    return describe


def feature_cache_file(cfg: RetrievalConfig, dataset: RevisitedRetrievalDataset,
                       split: str) -> pathlib.Path:
    """Cache path keyed by the weights file, model, data (the ground-truth file and every
    image of the split), image size and descriptor settings."""
    gnd_file = dataset.root / f"gnd_{dataset.dataset}.pkl"
    names = dataset.qimlist if split == "query" else dataset.imlist
    images = files_digest([dataset.image_path(name) for name in names], dataset.root)
    key = cache_key(_CACHE_VERSION, split, cfg.model, cfg.model.weights,
                    str(dataset.root.resolve()), gnd_file, images, cfg.data.image_size,
                    cfg.data.upscale, cfg.features.pooling, cfg.features.gem_p,
                    list(cfg.features.multiscale), cfg.precision)
    cache_dir = cfg.features.cache_dir or str(pathlib.Path(cfg.output_dir) / "feature_cache")
    return pathlib.Path(cache_dir) / f"{dataset.dataset}_{split}_{key}.pt"


def compute_features(cfg: RetrievalConfig, dataset: RevisitedRetrievalDataset, split: str,
                     get_backbone: Callable[[], Backbone], device: torch.device) -> Tensor:
    """L2-normalised descriptors of one split, (n, D) in dataset order; cached if enabled."""
    cache = feature_cache_file(cfg, dataset, split) if cfg.features.cache_features else None
    cached = load_cache(cache)
    if cached is not None:
        print(f"retrieval: reusing cached {split} features {cache}", file=sys.stderr)
        return cached["features"]
    images = RetrievalImages(dataset, split, cfg.data.image_size, cfg.data.upscale)
    batches = shape_buckets(images, cfg.data.batch_size)
    loader = DataLoader(images, batch_sampler=batches, num_workers=cfg.data.num_workers,
                        collate_fn=_collate)
    out = extract(loader, _describe_batch_fn(cfg, get_backbone, device),
                  desc=f"{dataset.dataset} {split}", total=len(batches))
    # Buckets reorder images; put the descriptors back in dataset order.
    features = torch.empty_like(out["features"])
    features[out["index"]] = out["features"]
    save_cache({"features": features}, cache)
    return features


# ------------------------------------------------------------------------------ plot
def medium_roles(gnd_entry: dict, n_db: int) -> list[str]:
    """``positive``/``negative``/``junk`` for every database image under the Medium protocol."""
    roles = ["negative"] * n_db
    for i in gnd_entry["junk"]:
        roles[int(i)] = "junk"
    for key in ("easy", "hard"):
        for i in gnd_entry[key]:
            roles[int(i)] = "positive"
    return roles


def framed(image: Tensor, colour: Sequence[float], width: int = 3) -> Tensor:
    """(3, H, W) image inside a solid frame of ``colour`` (one pad per channel)."""
    return torch.stack([F.pad(image[c], (width,) * 4, value=float(colour[c])) for c in range(3)])


def _thumb(image: Tensor, size: int) -> Tensor:
    return resize_image(image, shrink_shape(*image.shape[-2:], size, upscale=True))


def plot_topk(dataset: RevisitedRetrievalDataset, ranks: Tensor, cfg: RetrievalPlotConfig,
              path: pathlib.Path) -> pathlib.Path | None:
    """A grid: per row a query crop then its top-k database images, framed by Medium role."""
    n_q = len(dataset.qimlist)
    if cfg.num_queries <= 0 or n_q == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = torch.linspace(0, n_q - 1, min(cfg.num_queries, n_q)).round().long().unique().tolist()
    topk = min(cfg.topk, ranks.shape[0])
    fig, axes = plt.subplots(len(queries), topk + 1, figsize=(1.3 * (topk + 1), 1.4 * len(queries)),
                             squeeze=False)
    for row, q in enumerate(queries):
        roles = medium_roles(dataset.gnd[q], ranks.shape[0])
        tiles = [(framed(_thumb(dataset.query_image(q), cfg.thumb_size), _FRAME["query"]),
                  f"query {q}")]
        for r, db in enumerate(ranks[:topk, q].tolist()):
            tile = framed(_thumb(dataset.database_image(db), cfg.thumb_size), _FRAME[roles[db]])
            tiles.append((tile, f"#{r + 1}"))
        for ax, (tile, title) in zip(axes[row], tiles, strict=True):
            ax.imshow(tile.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{dataset.dataset}: top-{topk} (green positive, red negative, gray junk; Medium)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ run
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def summarize(metrics: RetrievalMetrics, dataset: RevisitedRetrievalDataset,
              cfg: RetrievalConfig, feature_dim: int) -> dict[str, Any]:
    """The ``results.json`` content: mAP and mP@k per protocol plus what was evaluated."""
    def count(keys: tuple[str, ...]) -> int:
        return sum(1 for g in dataset.gnd if sum(len(g[k]) for k in keys) > 0)

    # Queries with at least one positive under each protocol (the others are not scored).
    evaluated = {"easy": count(("easy",)), "medium": count(("easy", "hard")),
                 "hard": count(("hard",))}
    return {
        "dataset": dataset.dataset,
        "map": metrics.map,
        "mp_at_k": {name: {str(k): v for k, v in prs.items()}
                    for name, prs in metrics.mp_at_k.items()},
        "num_queries": len(dataset.qimlist),
        "num_database": len(dataset.imlist),
        "num_queries_evaluated": evaluated,
        "feature_dim": feature_dim,
        "pooling": cfg.features.pooling,
        "multiscale": list(cfg.features.multiscale),
        "image_size": cfg.data.image_size,
        "weights": cfg.model.weights,
    }


def run(cfg: RetrievalConfig) -> dict[str, Any]:
    """Extract (or load) features, rank, score, plot and write the run; returns the results."""
    validate(cfg)
    out = prepare_output_dir(cfg.output_dir)
    seed_all(cfg.seed)  # makes model.weights=null (random init) reproducible
    # Read the ground truth first: a missing pickle fails before any model is built.
    dataset = RevisitedRetrievalDataset(cfg.data.root, cfg.data.dataset, image_size=None)
    device = pick_device(cfg.device)
    # Built at most once, and only when some split is not cached.
    get_backbone = functools.cache(lambda: build_eval_backbone(cfg.model, device))
    query = compute_features(cfg, dataset, "query", get_backbone, device)
    database = compute_features(cfg, dataset, "database", get_backbone, device)
    ranks = similarity_ranks(query, database)
    metrics = revisited_map(ranks, dataset.gnd, ks=cfg.ks)
    results = summarize(metrics, dataset, cfg, query.shape[1])
    plot = plot_topk(dataset, ranks, cfg.plot, out / "retrieval_topk.png")
    results["plot"] = plot.name if plot is not None else None
    write_run(out, cfg, results)
    return results


def format_summary(results: dict[str, Any]) -> str:
    """One line: mAP E/M/H and Medium mP@k."""
    m = results["map"]
    prs = " ".join(f"mP@{k} {v:.2f}" for k, v in results["mp_at_k"]["medium"].items())
    return (f"{results['dataset']}: mAP E {m['easy']:.2f} M {m['medium']:.2f} H {m['hard']:.2f} "
            f"| Medium {prs} ({results['num_queries']} queries, {results['num_database']} images)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "Revisited Oxford/Paris retrieval (mAP E/M/H) of a frozen backbone",
                    RetrievalConfig, run, format_summary)


if __name__ == "__main__":
    main()
