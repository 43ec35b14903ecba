"""Science benchmark: the V-pretraining demo's four-arm comparison repeated over seeds.

``python benchmarks/synthetic_gain.py --seeds 3 [--steps N] [key=value ...]`` runs
:func:`demo.vpretrain.run_demo` once per seed (seed k sets ``train.seed`` and
``feedback.seed`` of every arm; the pretrained starting backbone in ``runs/demo`` is
shared, as in continued pretraining) and prints one JSON line:

- ``arms.<arm>.<metric>`` (arms: the demo's four, or ``--arms``; ``fixed`` is the
  augmentation designer at initialisation, never updated): mean, std (sample, ddof=1) and the per-seed values of seg mIoU,
  depth RMSE, linear top-1 and calibration r;
- ``gain_over_baseline.<arm>``: the per-seed differences to the baseline (seg and linear:
  arm - baseline; depth: baseline - arm, so positive is better everywhere), mean and std;
- ``gains.png`` in ``--out``: each arm's difference from the baseline per metric, mean
  with ± one standard deviation over the seeds;
- ``designers.<arm>``: the learned designer's parameters on 64 fixed scenes (mean over
  seeds), next to ``known_good``: the scenes carry class identity in hue only, so the
  right augmentation keeps colour (grayscale 0, small hue shift) where DINO's default
  (``*_default``) applies grayscale with probability 0.2 and hue jitter up to 0.1.

Each seed takes about as long as ``make demo`` without the pretraining (4-5 minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys
from typing import Any

import dinov  # noqa: F401  (torchvision shim first)
from demo.vpretrain import ALL_ARMS, ARMS, DemoSettings, plot_gains, run_demo

METRICS = ("seg_miou", "depth_rmse", "linear_top1", "calibration_r")
KNOWN_GOOD = {"grayscale": 0.0, "hue_jitter": 0.0,
              "note": "class identity is hue only: keep colour (no grayscale, no random hue "
                      "shift across views; a constant offset is a bijection on hue)"}


def spread(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": round(mean, 4), "std": round(std, 4), "values": [round(v, 4) for v in values]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(runs[0]["arms"])
    arms = {arm: {m: spread([float(r["arms"][arm].get(m, math.nan)) for r in runs]) for m in METRICS}
            for arm in names}
    gains: dict[str, Any] = {}
    for arm in names:
        if arm == "baseline":
            continue
        diff = {"seg_miou": [], "depth_rmse": [], "linear_top1": []}
        for r in runs:
            base, row = r["arms"]["baseline"], r["arms"][arm]
            diff["seg_miou"].append(row["seg_miou"] - base["seg_miou"])
            diff["depth_rmse"].append(base["depth_rmse"] - row["depth_rmse"])
            diff["linear_top1"].append(row["linear_top1"] - base["linear_top1"])
        gains[arm] = {k: spread(v) for k, v in diff.items()}
    designers: dict[str, dict[str, float]] = {}
    for arm in names:
        rows = [r["designers"][arm] for r in runs if arm in r.get("designers", {})]
        if rows:
            designers[arm] = {k: round(statistics.fmean(row[k] for row in rows), 4) for k in rows[0]}
    return {"arms": arms, "gain_over_baseline": gains, "designers": designers, "known_good": KNOWN_GOOD}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DemoSettings.steps)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/synthetic_gain"))
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms among {', '.join(ALL_ARMS)} (baseline first)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every arm")
    args = parser.parse_args(argv)
    arms = tuple(args.arms.split(","))
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown or arms[0] != "baseline":
        parser.error(f"--arms: expected 'baseline' first, then any of {list(ALL_ARMS)}; got {list(arms)}")
    runs = []
    for seed in range(args.seeds):
        print(f"[synthetic_gain] seed {seed}", file=sys.stderr, flush=True)
        settings = DemoSettings(steps=args.steps, out=args.out / f"seed{seed}", seed=seed,
                                plots=seed == 0, arm_overrides=list(args.overrides), arms=arms)
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the one JSON line
            runs.append(run_demo(settings))
    plot_gains([run["arms"] for run in runs], args.out / "gains.png")  # error bars over seeds
    line = {"benchmark": "synthetic_gain", "seeds": args.seeds, "steps": args.steps, "arm_names": list(arms),
            "overrides": args.overrides, **summarise(runs),
            "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1)}
    print(json.dumps(line))
    sys.stdout.flush()
    return line


if __name__ == "__main__":
    main()
