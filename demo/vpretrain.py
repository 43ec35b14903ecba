"""V-pretraining demo (``make demo``): ``python -m demo.vpretrain [--steps N] [--seed S]``.

(1) Pretrain the small plain-demo backbone once (``configs/demo.yaml``, cached under
``runs/demo``); (2) continue pretraining from its checkpoint with the same number of steps
in four arms through :mod:`designers.train`'s machinery (Trainer + VisionDesignerHook,
``configs/vdemo.yaml``): the baseline (``designer.kind=none``), the mask designer, the
augmentation designer and the random-feedback control (augmentation designer,
``feedback.mode=random``); (3) evaluate each arm's frozen final backbone with the
``eval/`` segmentation, depth and linear CLIs (small budgets, synthetic scenes written
once in the real layouts under ``runs/vdemo/data``); (4) print one table and write
``results.json`` plus PNGs (designed masks/views, calibration scatter, each arm's
difference from the baseline, loss curves) under ``runs/vdemo``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pathlib
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import dinov  # noqa: F401  (torchvision shim first)
from designers.train import run as run_arm
from designers.vision.augment import AugmentationDesigner
from designers.vision.config import VConfig, load_vconfig
from designers.vision.masks import SoftMaskDesigner
from dinov.checkpoint import load_checkpoint
from dinov.config import Config, load_config, to_yaml
from dinov.train.trainer import Trainer
from eval import depth, linear, segmentation

# arm name -> (designer.kind, feedback.mode, further overrides). The random-feedback
# control runs the augmentation designer: the designer that can change what the learner
# sees most, so the control separates the feedback's information from the designer's
# freedom (and from its regulariser, which alone keeps DINO's defaults).
ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "baseline": ("none", "real", ()),
    "mask": ("mask", "real", ()),
    "augment": ("augment", "real", ()),
    "random": ("augment", "random", ()),
}
# not in the demo's table; benchmarks/synthetic_gain.py can add them (--arms)
EXTRA_ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # the augmentation designer at initialisation, never updated: what the designer's
    # per-image kornia path does by itself, without any feedback
    "fixed": ("augment", "real", ("designer.fixed=true",)),
}
ALL_ARMS = {**ARMS, **EXTRA_ARMS}
LAYOUTS = (("imagefolder", "if"), ("ade20k", "ade"), ("nyu", "nyu"))


@dataclass
class DemoSettings:
    """Every knob of the demo; the CLI fills the common ones, tests shrink all of them."""

    steps: int = 300
    out: pathlib.Path = pathlib.Path("runs/vdemo")
    config: pathlib.Path = pathlib.Path("configs/vdemo.yaml")
    pretrain_config: pathlib.Path = pathlib.Path("configs/demo.yaml")
    pretrain_dir: pathlib.Path = pathlib.Path("runs/demo")
    pretrain_steps: int = 900
    skip_pretrain_if_cached: bool = True
    pretrain_overrides: list[str] = field(default_factory=list)
    arm_overrides: list[str] = field(default_factory=list)
    eval_images: int = 600
    eval_size: int = 48
    eval_iterations: int = 600
    eval_warmup: int = 50
    linear_epochs: int = 30
    plots: bool = True
    seed: int = 0  # train.seed and feedback.seed of every arm (the pretraining is shared)
    arms: tuple[str, ...] = tuple(ARMS)


# ----------------------------------------------------------------------------- stages


def _same_run_config(saved: pathlib.Path, cfg: Config) -> bool:
    """Whether the run at ``saved`` used ``cfg`` (how progress is shown does not count)."""
    if not saved.is_file():
        return False
    import yaml

    def training_part(text: str) -> dict[str, Any]:
        tree = yaml.safe_load(text)
        for key in ("progress", "plots", "log_every"):
            tree.get("train", {}).pop(key, None)
        return tree

    return training_part(saved.read_text()) == training_part(to_yaml(cfg))


def pretrain(s: DemoSettings) -> pathlib.Path:
    """The plain demo's final checkpoint; trains it (``configs/demo.yaml``) unless cached."""
    ckpt = s.pretrain_dir / "checkpoints" / f"checkpoint_{s.pretrain_steps:08d}.pt"
    cfg = load_config(str(s.pretrain_config), [f"output_dir={s.pretrain_dir}",
                                               f"train.steps={s.pretrain_steps}",
                                               *s.pretrain_overrides])
    assert isinstance(cfg, Config)
    same = _same_run_config(s.pretrain_dir / "config.yaml", cfg)  # a stale cache is retrained
    if ckpt.is_file() and same and s.skip_pretrain_if_cached:
        print(f"[vdemo] reusing cached pretrained backbone {ckpt}")
        return ckpt
    print(f"[vdemo] pretraining the plain demo backbone ({s.pretrain_steps} steps) -> {s.pretrain_dir}",
          flush=True)
    if s.pretrain_dir.exists():
        shutil.rmtree(s.pretrain_dir)
    Trainer(cfg).fit()
    if not ckpt.is_file():
        raise FileNotFoundError(f"pretraining finished without writing {ckpt}")
    return ckpt


def arm_config(s: DemoSettings, arm: str, weights: pathlib.Path) -> VConfig:
    """The continued-pretraining config of one arm."""
    kind, mode, extra = ALL_ARMS[arm]
    cfg = load_vconfig(str(s.config), [
        f"output_dir={s.out / arm}", f"model.weights={weights}", "model.weights_format=ours",
        f"train.steps={s.steps}", f"designer.kind={kind}", f"feedback.mode={mode}",
        f"train.seed={s.seed}", f"feedback.seed={s.seed}", *extra, *s.arm_overrides])
    assert isinstance(cfg, VConfig)
    return cfg


def train_arms(s: DemoSettings, weights: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Run the four arms from ``weights``; per arm the trainer's results plus wall time."""
    results: dict[str, dict[str, Any]] = {}
    for arm in s.arms:
        cfg = arm_config(s, arm, weights)
        if (s.out / arm).exists():  # a fresh run: no stale metrics rows or checkpoints
            shutil.rmtree(s.out / arm)
        print(f"[vdemo] arm {arm}: {s.steps} steps (designer.kind={cfg.designer.kind}, "
              f"feedback.mode={cfg.feedback.mode})", flush=True)
        started = time.perf_counter()
        result = run_arm(cfg)
        result["arm_seconds"] = round(time.perf_counter() - started, 1)
        result["checkpoint"] = str(s.out / arm / "checkpoints" / f"checkpoint_{s.steps:08d}.pt")
        results[arm] = result
    return results


def write_eval_data(s: DemoSettings) -> pathlib.Path:
    """Synthetic scenes in the ImageFolder/ADE20K/NYU layouts, written once per settings."""
    from dinov.data.synthetic import write_layout

    root = s.out / "data"
    stamp = {"n": s.eval_images, "size": s.eval_size, "seed": 7}
    marker = root / "layouts.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    for _, name in LAYOUTS:
        if (root / name).exists():
            shutil.rmtree(root / name)
    for layout, name in LAYOUTS:
        with contextlib.redirect_stdout(io.StringIO()):
            write_layout(root / name, layout, s.eval_images, seed=7, size=s.eval_size)
    marker.write_text(json.dumps(stamp))
    return root


def evaluate(s: DemoSettings, data: pathlib.Path, checkpoint: str, out: pathlib.Path) -> dict[str, float]:
    """Linear probe, segmentation and depth of one frozen backbone (small budgets), through
    each eval pipeline's typed ``run(cfg)``."""
    model = [f"model.weights={checkpoint}", "model.weights_format=ours"]
    warm = min(s.eval_warmup, max(s.eval_iterations - 1, 0))
    linear_cfg = load_config(None, [
        f"data.root={data / 'if'}", "data.resize_size=40", "data.image_size=32", "data.num_workers=0",
        f"linear.epochs={s.linear_epochs}", "linear.batch_size=128", *model,
        f"output_dir={out / 'linear'}"], schema=linear.LinearEvalConfig)
    seg_cfg = load_config(None, [
        f"data.root={data / 'ade'}", "data.num_classes=10", f"data.image_size={s.eval_size}",
        "data.num_workers=0", f"train.iterations={s.eval_iterations}", f"train.warmup_iters={warm}",
        "train.augment=false", "inference.mode=resize", *model,
        f"output_dir={out / 'segmentation'}"], schema=segmentation.SegmentationEvalConfig)
    depth_cfg = load_config(None, [
        f"data.root={data / 'nyu'}", "data.num_workers=0", "train.precompute=true",
        f"train.iterations={s.eval_iterations}", "train.lr=1e-3", f"train.warmup_iters={warm}",
        *model, f"output_dir={out / 'depth'}"], schema=depth.DepthEvalConfig)
    linear_top1 = float(linear.run(linear_cfg)["top1"])  # the order the demo always ran
    seg_miou = float(segmentation.run(seg_cfg)["miou"])
    depth_rmse = float(depth.run(depth_cfg)["rmse"])
    return {"seg_miou": seg_miou, "depth_rmse": depth_rmse, "linear_top1": linear_top1}


# ----------------------------------------------------------------------------- designers


def _scenes(n: int, size: int):  # noqa: ANN202  (a SceneBatch)
    """The fixed scenes every designer summary and plot is shown on."""
    from dinov.data.synthetic import render_scenes

    return render_scenes(n, size, 12345)


def _fixed_images(n: int, size: int) -> torch.Tensor:
    return _scenes(n, size).images.float().clamp(0, 1)


def global_view_designer(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The global-view augmentation designer's weights out of the hook's saved state."""
    return {k.removeprefix("global."): v for k, v in state["designer"].items() if k.startswith("global.")}


def augment_summary(cfg: VConfig, state: dict[str, Any], n: int = 64, draws: int = 8) -> dict[str, float]:
    """What an augmentation designer does to n fixed scenes, and DINO's default for each.

    The scenes carry class identity in hue only, so the known-good choice is grayscale 0 and
    little hue jitter (``hue_jitter``: the std of the hue shift over draws for one image,
    averaged over images); ``*_default`` is the untrained designer (DINO's defaults).
    """
    images = _fixed_images(n, cfg.data.image_size)
    out: dict[str, float] = {}
    for tag, load in (("", True), ("_default", False)):
        aug = AugmentationDesigner(cfg.crops, view="global1")
        if load:
            aug.load_state_dict(global_view_designer(state))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            raw_mean, raw_std = aug.predict(images)
            sampled = torch.stack([aug.bounded(raw_mean + raw_std * torch.randn(raw_mean.shape, generator=gen))
                                   for _ in range(draws)])
        names = list(aug.specs)
        col = {name: sampled[..., i] for i, name in enumerate(names)}
        out[f"grayscale{tag}"] = round(float(col["grayscale"].mean()), 4)
        out[f"abs_hue_shift{tag}"] = round(float(col["hue"].abs().mean()), 4)
        # |hue| mixes a constant offset (harmless: a bijection on hue) with random jitter
        # across views (what destroys class identity): report both
        out[f"hue_mean{tag}"] = round(float(col["hue"].mean()), 4)
        out[f"hue_jitter{tag}"] = round(float(col["hue"].std(0).mean()), 4)
        out[f"saturation{tag}"] = round(float(col["saturation"].mean()), 4)
        out[f"blur_sigma{tag}"] = round(float(col["blur_sigma"].mean()), 4)
    return out


def mask_summary(cfg: VConfig, state: dict[str, Any], n: int = 64) -> dict[str, float]:
    """Mean μ of the mask designer on object pixels and on wall/floor pixels of n fixed scenes."""
    import torch.nn.functional as F

    scenes = _scenes(n, cfg.data.image_size)
    size = cfg.crops.global_crops_size
    images = F.interpolate(scenes.images.float().clamp(0, 1), size=(size, size), mode="bilinear", antialias=True)
    labels = F.interpolate(scenes.labels[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    mean = torch.tensor(cfg.crops.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.crops.normalize_std).view(1, 3, 1, 1)
    designer = SoftMaskDesigner()
    designer.load_state_dict(state["designer"])
    with torch.no_grad():
        mu = designer.eval().mask((images - mean) / std)[:, 0]
    objects = labels >= 3
    return {"mu_mean": round(float(mu.mean()), 4), "mu_objects": round(float(mu[objects].mean()), 4),
            "mu_wall_floor": round(float(mu[~objects].mean()), 4)}


def designer_summaries(s: DemoSettings, arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The learned designer of every designed arm, summarised (see the two functions above)."""
    out: dict[str, dict[str, float]] = {}
    for arm, row in arms.items():
        kind = ALL_ARMS[arm][0]
        state = _hook_state(row["checkpoint"])
        if kind == "none" or not state:
            continue
        cfg = arm_config(s, arm, pathlib.Path(row["checkpoint"]))
        out[arm] = augment_summary(cfg, state) if kind == "augment" else mask_summary(cfg, state)
    return out


# ----------------------------------------------------------------------------- report

COLUMNS = (("seg mIoU", "seg_miou", "{:.1f}"), ("depth RMSE", "depth_rmse", "{:.3f}"),
           ("linear top-1", "linear_top1", "{:.1f}"), ("calib. r", "calibration_r", "{:+.2f}"),
           ("train s", "arm_seconds", "{:.0f}"), ("eval s", "eval_seconds", "{:.0f}"))


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per arm; an undefined value (nan/None) prints as ``n/a``."""
    header = ["arm", *[c[0] for c in COLUMNS]]
    body = []
    for arm, row in rows.items():
        cells = [arm]
        for _, key, fmt in COLUMNS:
            value = row.get(key)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            cells.append(fmt.format(value) if ok else "n/a")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _hook_state(checkpoint: str) -> dict[str, Any]:
    """The designer hook's meta core state in a checkpoint ({} for the baseline)."""
    return load_checkpoint(checkpoint)["hooks"].get("designer", {}).get("core", {})


def plot_designs(s: DemoSettings, arms: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    """Rows: the 8 fixed images, the mask designer's μ and masked view, the augmentation
    designer's mean-parameter view and one sampled view (final designers of the arms)."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    cfg = arm_config(s, "baseline", pathlib.Path(arms["baseline"]["checkpoint"]))
    images = _fixed_images(8, cfg.data.image_size)
    size = cfg.crops.global_crops_size
    mean = torch.tensor(cfg.crops.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.crops.normalize_std).view(1, 3, 1, 1)
    rows: list[tuple[str, torch.Tensor]] = [("image", F.interpolate(images, size=(size, size), mode="bilinear",
                                                                    antialias=True))]
    with torch.no_grad():
        mask_state = _hook_state(arms["mask"]["checkpoint"]) if "mask" in arms else {}
        if mask_state:
            designer = SoftMaskDesigner()
            designer.load_state_dict(mask_state["designer"])
            views, mu = designer.eval()((rows[0][1] - mean) / std)
            rows += [("mask μ", mu.expand(-1, 3, -1, -1)), ("masked view", views * std + mean)]
        aug_state = _hook_state(arms["augment"]["checkpoint"]) if "augment" in arms else {}
        if aug_state:
            aug = AugmentationDesigner(cfg.crops, view="global1")
            aug.load_state_dict(global_view_designer(aug_state))
            aug.eval()
            mean_view, _ = aug(images, size, sample=False)
            sampled, _ = aug(images, size, sample=True, generator=torch.Generator().manual_seed(0))
            rows += [("aug. (mean)", mean_view * std + mean), ("aug. (sample)", sampled * std + mean)]
    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 1.2, len(rows) * 1.25), squeeze=False)
    for r, (name, batch) in enumerate(rows):
        for c in range(8):
            ax = axes[r][c]
            ax.imshow(batch[c].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("final designers on 8 fixed scenes (mask arm, augmentation arm)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(arms: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    """Predicted (−lr·V) against realised ΔL_down per meta step, one panel per designed arm."""
    import matplotlib.pyplot as plt

    names = [a for a in arms if "calibration_r" in arms[a]]  # arms that took meta steps
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, arm in zip(axes[0], names, strict=True):
        calibration = _hook_state(arms[arm]["checkpoint"]).get("calibration", {})
        pred, real = calibration.get("predicted", []), calibration.get("realised", [])
        ax.scatter(pred, real, s=10, alpha=0.7)
        r = arms[arm].get("calibration_r", math.nan)
        ax.set_title(f"{arm}: r = {r:+.2f} (n = {len(pred)})", fontsize=9)
        ax.set_xlabel("predicted ΔL_down = −lr·V")
        ax.set_ylabel("realised ΔL_down")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GAIN_METRICS = (("seg_miou", "seg mIoU − baseline (↑ better)"),
                ("depth_rmse", "depth RMSE − baseline (↓ better)"),
                ("linear_top1", "linear top-1 − baseline (↑ better)"))


def plot_gains(runs: list[dict[str, dict[str, Any]]], path: pathlib.Path) -> None:
    """Each designed arm's difference from the baseline, per metric: the mean over the
    runs (seeds) with ± one standard deviation as error bars (none for one seed)."""
    import statistics

    import matplotlib.pyplot as plt

    arms = [a for a in runs[0] if a != "baseline"]
    fig, axes = plt.subplots(1, len(GAIN_METRICS), figsize=(4 * len(GAIN_METRICS), 3.4))
    for ax, (key, title) in zip(axes, GAIN_METRICS, strict=True):
        diffs = [[float(run[a][key]) - float(run["baseline"][key]) for run in runs] for a in arms]
        means = [statistics.fmean(d) for d in diffs]
        errors = [statistics.stdev(d) if len(d) > 1 else 0.0 for d in diffs]
        ax.bar(arms, means, yerr=errors if len(runs) > 1 else None, capsize=4,
               color=["tab:blue", "tab:orange", "tab:red", "tab:green"][: len(arms)])
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    seeds = f"mean ± std over {len(runs)} seeds" if len(runs) > 1 else "one seed"
    fig.suptitle(f"difference from the baseline arm ({seeds})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(s: DemoSettings, arms: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    """Pretraining loss per logged step for every arm (from each run's metrics.jsonl)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in arms:
        metrics = s.out / arm / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=arm)
    ax.set_xlabel("continued-pretraining step")
    ax.set_ylabel("DINO+iBOT loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """The whole demo; returns (and writes to ``results.json``) per-arm rows and timings."""
    started = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    weights = pretrain(s)
    arms = train_arms(s, weights)
    data = write_eval_data(s)
    for arm, row in arms.items():
        print(f"[vdemo] evaluating {arm}", flush=True)
        t0 = time.perf_counter()
        row.update(evaluate(s, data, row["checkpoint"], s.out / arm / "eval"))
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    designers = designer_summaries(s, arms)
    pngs: list[str] = []
    if s.plots:
        for name, fn in (("designs.png", lambda p: plot_designs(s, arms, p)),
                         ("calibration.png", lambda p: plot_calibration(arms, p)),
                         ("gains.png", lambda p: plot_gains([arms], p)),
                         ("curves.png", lambda p: plot_curves(s, arms, p))):
            fn(s.out / name)
            pngs.append(str(s.out / name))
    table = format_table(arms)
    wall = round(time.perf_counter() - started, 1)
    pretrain_file = s.pretrain_dir / "results.json"
    pretrained = json.loads(pretrain_file.read_text()) if pretrain_file.is_file() else {}
    results = {"steps": s.steps, "seed": s.seed, "pretrained_from": str(weights), "wall_seconds": wall,
               "pretrain_probe": {k: pretrained.get(k) for k in ("probe_top1_init", "probe_top1_final")},
               "arms": arms, "designers": designers, "pngs": pngs, "table": table}
    (s.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(f"continued pretraining from {weights}, {s.steps} steps per arm "
          f"(seg/depth on {s.eval_iterations} head iterations, linear {s.linear_epochs} epochs)")
    print(table)
    for arm, summary in designers.items():
        print(f"{arm} designer: " + ", ".join(f"{k} {v:g}" for k, v in summary.items()))
    print(f"\ntotal {wall} s; outputs in {s.out}/ (results.json, {', '.join(pathlib.Path(p).name for p in pngs)})")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="continued-pretraining steps per arm")
    parser.add_argument("--skip-pretrain-if-cached", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse runs/demo's final checkpoint when present (default: yes)")
    parser.add_argument("--out", type=pathlib.Path, default=DemoSettings.out)
    parser.add_argument("--eval-iterations", type=int, default=DemoSettings.eval_iterations)
    parser.add_argument("--seed", type=int, default=DemoSettings.seed, help="seed of every arm")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every arm, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    return run_demo(DemoSettings(steps=args.steps, skip_pretrain_if_cached=args.skip_pretrain_if_cached,
                                 out=args.out, eval_iterations=args.eval_iterations, seed=args.seed,
                                 arm_overrides=list(args.overrides)))


if __name__ == "__main__":
    main()
