"""Does pretraining help? Every eval CLI on a trained checkpoint and on the same backbone at
initialisation, on synthetic scenes written in the real layouts. Prints one JSON line.

The initial backbone is rebuilt exactly as the trainer built it (``torch.manual_seed`` with
the run's ``train.seed``, then ``build_backbone``: the first draw from the RNG in a run)
and saved as a timm state dict, so both arms go through the same loading path.

Usage: ``python benchmarks/pretrain_gain.py --checkpoint runs/demo/checkpoints/checkpoint_00000900.pt``
(after ``make demo``). Small head-training budgets keep it to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf

import dinov  # noqa: F401  (torchvision shim first)
from dinov.config import ModelConfig, load_config
from dinov.data.synthetic import write_layout
from dinov.models import build_backbone
from eval import depth, knn, linear, retrieval, segmentation
from eval.common import resolve_model_config


def initial_backbone_file(checkpoint: pathlib.Path, out: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """The run's initial backbone as a timm file, and the model.* overrides that build it."""
    model_cfg = resolve_model_config(OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.structured(ModelConfig), {"weights": str(checkpoint)})))
    saved = OmegaConf.create(torch.load(checkpoint, map_location="cpu", weights_only=True)["config"])
    torch.manual_seed(int(saved.train.seed))
    init_cfg = OmegaConf.merge(OmegaConf.structured(model_cfg), {"weights": None})
    backbone = build_backbone(OmegaConf.to_object(init_cfg))
    path = out / "init_backbone.pth"
    torch.save(backbone.model.state_dict(), path)
    overrides = [f"model.{k}={v if v is not None else 'null'}" for k, v in
                 OmegaConf.to_container(init_cfg).items()
                 if k in ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                          "num_register_tokens", "layerscale_init")]
    return path, overrides


def eval_arms(data: pathlib.Path, out: pathlib.Path, arms: dict[str, list[str]]) -> dict[str, dict]:
    """Every eval pipeline's typed ``run(cfg)`` on every arm's backbone."""
    jobs: dict[str, tuple[Callable[[Any], dict], type, list[str], Callable[[dict], dict]]] = {
        "linear": (linear.run, linear.LinearEvalConfig,
                   [f"data.root={data / 'if'}", "data.resize_size=40", "data.image_size=32",
                    "data.num_workers=0", "linear.epochs=30", "linear.batch_size=128"],
                   lambda r: {"linear_top1": r["top1"]}),
        "knn": (knn.run, knn.KnnEvalConfig,
                [f"data.root={data / 'if'}", "data.resize_size=40", "data.image_size=32",
                 "data.num_workers=0"], lambda r: {"knn_top1": r["top1"]}),
        "segmentation": (segmentation.run, segmentation.SegmentationEvalConfig,
                         [f"data.root={data / 'ade'}", "data.num_classes=10", "data.image_size=48",
                          "data.num_workers=0", "train.iterations=600", "train.warmup_iters=50",
                          "train.augment=false", "inference.mode=resize"],
                         lambda r: {"seg_miou": r["miou"], "seg_aacc": r["aacc"], "seg_macc": r["macc"]}),
        "depth": (depth.run, depth.DepthEvalConfig,
                  [f"data.root={data / 'nyu'}", "data.num_workers=0", "train.precompute=true",
                   "train.iterations=600", "train.lr=1e-3", "train.warmup_iters=50"],
                  lambda r: {f"depth_{k}": r[k] for k in ("rmse", "abs_rel", "log10", "d1")}),
        "retrieval": (retrieval.run, retrieval.RetrievalConfig,
                      [f"data.root={data / 'rox'}", "data.image_size=48", "data.num_workers=0"],
                      lambda r: {f"retrieval_map_{k}": v for k, v in r["map"].items()}),
    }
    results: dict[str, dict] = {}
    for name, (run, schema, args, pick) in jobs.items():
        for arm, model_args in arms.items():
            cfg = load_config(None, [*args, *model_args, f"output_dir={out / arm / name}"],
                              schema=schema)
            result = run(cfg)
            for metric, value in pick(result).items():
                results.setdefault(metric, {})[arm] = round(float(value), 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path)
    parser.add_argument("--n", type=int, default=400, help="synthetic images per layout")
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for layout, name in (("imagefolder", "if"), ("ade20k", "ade"), ("nyu", "nyu"), ("roxford", "rox")):
            with contextlib.redirect_stdout(io.StringIO()):
                write_layout(root / "data" / name, layout, args.n, seed=7, size=args.size)
        init_path, model_args = initial_backbone_file(args.checkpoint, root)
        arms = {
            "trained": [f"model.weights={args.checkpoint}"],
            "init": [*model_args, f"model.weights={init_path}", "model.weights_format=timm"],
        }
        results = eval_arms(root / "data", root / "runs", arms)
    lower_is_better = {"depth_rmse", "depth_abs_rel", "depth_log10"}
    better = {m: (v["trained"] < v["init"]) if m in lower_is_better else (v["trained"] > v["init"])
              for m, v in results.items()}
    print(json.dumps({"benchmark": "pretrain_gain", "checkpoint": str(args.checkpoint),
                      **results, "trained_better": better, "all_better": all(better.values())}))


if __name__ == "__main__":
    main()
