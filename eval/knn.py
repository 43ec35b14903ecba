"""kNN evaluation CLI: ``python -m eval.knn --config configs/eval/knn.yaml key=value ...``.

Frozen features of an ImageFolder train/val pair (:mod:`eval.features`), classified by
DINO's weighted cosine kNN (:func:`dinov.metrics.knn_classify`: L2-normalised features,
top-k neighbours vote with weight ``exp(sim / T)``; defaults k in 10, 20, 100, 200 and
T = 0.07). This module owns the CLI's schema, the run and its outputs in ``output_dir``:
``config.yaml`` (resolved), ``results.json`` (top-1/top-5 per k) and ``knn_k.png``
(top-1 against k).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinov.config import ConfigError, ModelConfig
from dinov.metrics import knn_classify, topk_accuracy
from eval.features import (
    FeatureConfig,
    FeatureSet,
    ImageFolderDataConfig,
    check_config,
    describe_features,
    load_imagefolder_features,
    model_summary,
    resolve_device,
)
from eval.pipeline import cli_main, prepare_output_dir, seed_all, write_run


@dataclass
class KnnConfig:
    """DINO's kNN protocol; ``chunk_size`` val images are compared with all train at once."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    chunk_size: int = 256


@dataclass
class KnnEvalConfig:
    """A kNN evaluation run."""

    output_dir: str = "runs/eval_knn"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ImageFolderDataConfig = field(default_factory=ImageFolderDataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    seed: int = 0
    device: str = "auto"


def validate(cfg: KnnEvalConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    check_config(cfg.data, cfg.features)
    if not cfg.knn.ks or min(cfg.knn.ks) < 1:
        raise ConfigError(
            f"config key 'knn.ks' must be a non-empty list of k >= 1, got {cfg.knn.ks}"
        )
    if cfg.knn.temperature <= 0 or cfg.knn.chunk_size < 1:
        raise ConfigError("config keys 'knn.temperature' and 'knn.chunk_size' must be positive")


def run_knn(cfg: KnnEvalConfig, fs: FeatureSet) -> dict[str, Any]:
    """kNN top-1/top-5 per k on ``fs``; returns the results.json content."""
    device = resolve_device(cfg.device)
    scores = knn_classify(
        fs.train.features.to(device), fs.train.labels.to(device), fs.val.features.to(device),
        fs.num_classes, ks=cfg.knn.ks, temperature=cfg.knn.temperature,
        chunk_size=cfg.knn.chunk_size,
    )
    per_k = {}
    for k in cfg.knn.ks:
        acc = topk_accuracy(scores[k], fs.val.labels.to(device), ks=(1, 5))
        per_k[str(k)] = {"top1": acc[1], "top5": acc[5]}
    best = max(cfg.knn.ks, key=lambda k: per_k[str(k)]["top1"])  # first best on ties
    return {
        "per_k": per_k,
        "best_k": best,
        "top1": per_k[str(best)]["top1"],
        "top5": per_k[str(best)]["top5"],
        "temperature": cfg.knn.temperature,
        # k larger than the train set uses every train sample (knn_classify clips it).
        "k_clipped_to": min(max(cfg.knn.ks), int(fs.train.features.shape[0])),
        **describe_features(fs, cfg.features),
    }


def plot_ks(results: dict[str, Any], path: Any) -> None:
    """Val top-1 (and top-5) against k, on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in results["per_k"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for metric in ("top1", "top5"):
        ax.plot(ks, [results["per_k"][str(k)][metric] for k in ks], marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("val accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"kNN (T={results['temperature']:g}, {results['feature_kind']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: KnnEvalConfig) -> dict[str, Any]:
    """Validate, extract (or load) features, classify by kNN, write the run."""
    validate(cfg)
    out = prepare_output_dir(cfg.output_dir)
    seed_all(cfg.seed)
    fs = load_imagefolder_features(cfg.model, cfg.data, cfg.features, resolve_device(cfg.device))
    results = run_knn(cfg, fs)
    results["model"] = model_summary(cfg.model)
    path = write_run(out, cfg, results)
    plot_ks(results, path.parent / "knn_k.png")
    return results


def report(results: dict[str, Any]) -> str:
    return "knn top-1  " + "  ".join(f"k={k}: {v['top1']:.2f}" for k, v in results["per_k"].items())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "Weighted kNN evaluation of a frozen backbone on an ImageFolder "
                    "train/val pair.", KnnEvalConfig, run, report)


if __name__ == "__main__":
    main()
