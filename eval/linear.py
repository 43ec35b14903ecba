"""Linear evaluation CLI: ``python -m eval.linear --config configs/eval/linear.yaml key=value ...``.

Frozen features of an ImageFolder train/val pair (:mod:`eval.features`), then a grid of
linear heads, one per learning rate, trained together on one pass of features by
:func:`dinov.metrics.train_linear_probes` (SGD momentum 0.9, cosine decay, features
standardised with train statistics). The head with the best val top-1 is reported, as
in DINOv2's linear evaluation. This module owns the CLI's schema, the run and its
outputs in ``output_dir``: ``config.yaml`` (resolved), ``results.json`` and
``linear_lr.png`` (val top-1 per learning rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinov.config import ConfigError, ModelConfig
from dinov.metrics import train_linear_probes
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
class LinearHeadsConfig:
    """The head grid: one head per ``lrs`` entry, ``epochs`` passes over the train features.

    Defaults follow DINOv2's budget (10 ImageNet epochs at batch 1024, no weight decay);
    the lrs apply to standardised features, so one grid suits every backbone.
    """

    lrs: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    )
    epochs: int = 10
    batch_size: int = 1024
    weight_decay: float = 0.0


@dataclass
class LinearEvalConfig:
    """A linear evaluation run."""

    output_dir: str = "runs/eval_linear"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ImageFolderDataConfig = field(default_factory=ImageFolderDataConfig)
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(kind="cls_avgpool"))
    linear: LinearHeadsConfig = field(default_factory=LinearHeadsConfig)
    seed: int = 0
    device: str = "auto"


def validate(cfg: LinearEvalConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    check_config(cfg.data, cfg.features)
    heads = cfg.linear
    if not heads.lrs or min(heads.lrs) <= 0:
        raise ConfigError(
            f"config key 'linear.lrs' must be a non-empty list of lr > 0, got {heads.lrs}"
        )
    if heads.epochs < 1 or heads.batch_size < 1:
        raise ConfigError("config keys 'linear.epochs' and 'linear.batch_size' must be >= 1")


def run_linear(cfg: LinearEvalConfig, fs: FeatureSet) -> dict[str, Any]:
    """Train the head grid on ``fs`` and return the results.json content."""
    device = resolve_device(cfg.device)
    heads = cfg.linear
    result = train_linear_probes(
        fs.train.features.to(device), fs.train.labels.to(device),
        fs.val.features.to(device), fs.val.labels.to(device), fs.num_classes,
        lrs=heads.lrs, epochs=heads.epochs, batch_size=heads.batch_size,
        weight_decay=heads.weight_decay, seed=cfg.seed,
    )
    return {
        "top1": result.top1,
        "top5": result.top5,
        "best_lr": result.best_lr,
        # JSON keys are strings; repr keeps 1e-4 and 0.0001 the same key.
        "top1_per_lr": {repr(lr): acc for lr, acc in result.accuracies.items()},
        **describe_features(fs, cfg.features),
    }


def plot_lrs(results: dict[str, Any], path: Any) -> None:
    """Bar chart of val top-1 per learning rate, the best one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = list(results["top1_per_lr"])
    accs = [results["top1_per_lr"][lr] for lr in lrs]
    colours = ["tab:orange" if float(lr) == results["best_lr"] else "tab:blue" for lr in lrs]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(lrs) + 1.5), 3.2))
    ax.bar(range(len(lrs)), accs, color=colours)
    ax.set_xticks(range(len(lrs)), [f"{float(lr):g}" for lr in lrs], rotation=45)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("val top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"linear probe ({results['feature_kind']}): best {results['top1']:.2f}%")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: LinearEvalConfig) -> dict[str, Any]:
    """Validate, extract (or load) features, train the head grid, write the run."""
    validate(cfg)
    out = prepare_output_dir(cfg.output_dir)
    seed_all(cfg.seed)
    fs = load_imagefolder_features(cfg.model, cfg.data, cfg.features, resolve_device(cfg.device))
    results = run_linear(cfg, fs)
    results["model"] = model_summary(cfg.model)
    path = write_run(out, cfg, results)
    plot_lrs(results, path.parent / "linear_lr.png")
    return results


def report(results: dict[str, Any]) -> str:
    return (f"linear: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  "
            f"(best lr {results['best_lr']:g})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "Linear evaluation of a frozen backbone on an ImageFolder train/val pair.",
                    LinearEvalConfig, run, report)


if __name__ == "__main__":
    main()
