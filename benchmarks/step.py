"""Step-time benchmark: the full DINO + iBOT + KoLeo learner step against its backbone floor.

Prints one JSON line. The variants run in turns, one round after another in this one
process (benchmarks/timing.py), on the same pre-built crops (multicrop augmentation is
timed separately, because it is data loading work that can overlap the step); each ratio
is the median of the per-round ratios, with its 25th/75th percentiles, and times are
medians.

- ``full``: ``Trainer.learner_step``: teacher forward + heads + centering/Sinkhorn, student
  forward on global (masked) and local crops + heads, DINO/iBOT/KoLeo losses, backward,
  gradient clipping, AdamW, EMA teacher update, center update.
- ``floor``: the backbone passes any DINO step must make on those crops: student backbone
  forward+backward on the global (masked) and local crops, plus the teacher backbone
  forward on the global crops; no heads, losses, optimizer or EMA.
- ``student_backbone``: the student backbone forward+backward alone (the strictest floor).

``dino_step_over_floor = full / floor`` is the target metric (<= 1.15). The heads'
matrix products are part of the method, not overhead, and their share shrinks with the
backbone: with 65536 prototypes they are about a quarter of ViT-S/14's FLOPs but a few
percent of ViT-L's, so the default preset is the published ViT-L setting.

Usage: ``python benchmarks/step.py [--preset vitl16|vits14|cpu-small] [--steps ROUNDS] [key=value ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
from timing import interleaved_rounds, ratio_summary

import dinov  # noqa: F401  (torchvision shim first)
from dinov.config import Config, load_config
from dinov.data.masking import sample_block_masks
from dinov.data.multicrop import MultiCropAugmentation
from dinov.train.task import Task
from dinov.train.trainer import Trainer

PRESETS: dict[str, list[str]] = {
    # the published continued-pretraining setting: DINOv3 ViT-L/16, 2x224 + 8x96 crops,
    # 65536 prototypes; batch scaled for a CPU
    "vitl16": ["model.arch=vit_large_patch16_dinov3", "model.img_size=224", "data.batch_size=2",
               "crops.global_crops_size=224", "crops.local_crops_size=96",
               "crops.local_crops_number=8"],
    # DINOv2 ViT-S/14 recipe (2x224 + 8x98 crops, 65536 prototypes), batch scaled for a CPU
    "vits14": ["model.arch=vit_small_patch14_dinov2", "model.img_size=224", "data.batch_size=4",
               "crops.global_crops_size=224", "crops.local_crops_size=98",
               "crops.local_crops_number=8"],
    # the demo's model: quick, for a laptop
    "cpu-small": ["model.arch=vit_small_patch14_dinov2", "model.img_size=48", "model.patch_size=8",
                  "model.embed_dim=96", "model.depth=4", "model.num_heads=4", "data.batch_size=64",
                  "crops.global_crops_size=48", "crops.local_crops_size=24",
                  "crops.local_crops_number=4", "head.out_dim=1024", "head.ibot_out_dim=1024",
                  "head.hidden_dim=256", "head.bottleneck_dim=96"],
}


def make_task(cfg: Config, trainer: Trainer) -> tuple[Task, torch.Tensor, MultiCropAugmentation]:
    size = cfg.crops.global_crops_size
    images = torch.rand(cfg.data.batch_size, 3, size + size // 4, size + size // 4)
    task = trainer.build_task(images)
    return task, images, MultiCropAugmentation(cfg.crops)


def floor_fn(trainer: Trainer, task: Task, student_only: bool) -> Callable[[], None]:
    backbone = trainer.model.student["backbone"]
    teacher = trainer.model.teacher["backbone"]

    def run() -> None:
        if not student_only:
            with torch.no_grad():
                teacher(task.teacher_global)
        out_global = backbone(task.student_global, task.masks.masks)
        out_local = backbone(task.local)
        loss = out_global.patch.mean() + out_global.cls.mean() + out_local.cls.mean()
        loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vitl16", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(None, [*PRESETS[args.preset], "data.num_samples=64", "probe.enabled=false",
                             "train.steps=1000", "output_dir=runs/bench_step", *args.overrides])
    cfg.data.num_samples = max(cfg.data.num_samples, cfg.data.batch_size)
    trainer = Trainer(cfg)
    task, images, augment = make_task(cfg, trainer)
    sched = trainer.schedules.at(10)
    grid = trainer.model.backbone.patch_grid(cfg.crops.global_crops_size, cfg.crops.global_crops_size)
    times = interleaved_rounds({
        "full": lambda: trainer.learner_step(task, sched),
        "floor": floor_fn(trainer, task, student_only=False),
        "student": floor_fn(trainer, task, student_only=True),
        "augment": lambda: (augment(images), sample_block_masks(2 * images.shape[0], grid, cfg.masks)),
    }, args.steps, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "benchmark": "step", "preset": args.preset, "threads": torch.get_num_threads(),
        "rounds": args.steps,
        # the full step does everything the floors do and more: a ratio below 1 is noise
        **ratio_summary("dino_step_over_floor", times["full"], times["floor"], at_least_one=True),
        **ratio_summary("dino_step_over_student_backbone", times["full"], times["student"],
                        at_least_one=True),
        "full_step_s": round(median["full"], 4), "floor_s": round(median["floor"], 4),
        "student_backbone_s": round(median["student"], 4), "augment_s": round(median["augment"], 4),
        **ratio_summary("augment_over_full_step", times["augment"], times["full"]),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
