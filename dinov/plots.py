"""PNG plots of a run's curves, read back from its ``metrics.jsonl``."""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path,
                keys: tuple[str, ...], title: str) -> pathlib.Path | None:
    """One panel per key present in the metrics; returns the PNG path, or None if no data."""
    rows = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_run(output_dir: str | pathlib.Path) -> list[pathlib.Path]:
    output_dir = pathlib.Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    made = [
        plot_curves(metrics, output_dir / "loss.png", ("loss", "dino", "ibot", "koleo"), "training losses"),
        plot_curves(metrics, output_dir / "probe.png", ("probe_top1",), "online linear probe (top-1 %)"),
        plot_curves(metrics, output_dir / "schedules.png", ("lr", "momentum", "teacher_temp"), "schedules"),
    ]
    return [p for p in made if p is not None]
