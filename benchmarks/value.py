"""Value-estimator benchmark: fd and jvp against exact on a DINO/iBOT student, and the cost
of the whole V-pretraining step against the plain DINO step.

Prints one JSON line. Each estimator variant is one designer-gradient evaluation: V along
a fixed random unit direction in the aligned parameters (last ``--aligned`` blocks +
final norm), then ``autograd.grad(V, φ)`` for a per-image brightness designer φ, with
precomputed teacher targets. ``train_step`` is the learner's forward + backward of the
same loss (no optimizer).

- ``fd``: the meta step's estimator, through the meta step's own call
  (:func:`designers.vision.value.designed_loss_derivative`): central difference split at the
  aligned blocks, the trunk once, the aligned blocks and heads at θ_S ± εv. ``exact``
  and ``jvp`` go through the same call; in all of them the learner parameters outside
  θ_S are frozen while the graph is built (:func:`designers.value.grad_only_for`).
- ``fd_recompute``: the same with ``value.recompute=true`` (the trunk's graph rebuilt in
  the backward: less memory, one more trunk forward).
- ``fd_plain``: fd over the whole network twice (no split), for reference.
- ``*_cos``: cosine of the designer gradient against ``exact``.
- ``*_time_ratio``: wall time over ``exact``'s (and ``*_over_train_step``): all variants
  run in turns in one process, and the ratio is the median of the per-round ratios with
  its 25th/75th percentiles (benchmarks/timing.py).
- ``*_mem_ratio``: peak memory over ``exact``'s. On CUDA: ``torch.cuda.max_memory_allocated``
  growth during one evaluation. On CPU there is no allocator counter, so every variant runs
  in its own fresh subprocess and the peak is the growth of the process's max RSS
  (``resource.getrusage``) over one evaluation, measured before any other evaluation ran
  there; it includes allocator slack, so treat CPU ratios as approximate.
- ``vstep_every1_over_dino``, ``vstep_every4_over_dino``: time of a training step
  with the designer hook taking a meta step every 1 / 4 steps (heads fit, g_down, V,
  designer update, calibration; designed views on every step) over the plain step: the
  three trainers live in one process and run in turns, 4 steps each per round, on
  ``--vstep-config``; medians of the per-round ratios, flagged when below 1. ``vstep_every1_stage_ms``: where the
  time goes (ms per step with a meta step every step: head fitting, g_down, designer
  forward, V, designer update, calibration, learner step; thin wrappers around each stage
  of the every-1 run). Settings (:data:`VSTEP_PRESETS`): ``--vstep-preset recipe``
  (default) gives the small model the full-scale recipes' per-GPU shares of V and of
  feedback work per learner image; the ``--vstep-compare`` presets (default ``demo``: the
  demo's feedback settings, V on a quarter of the batch) are reported as
  ``vstep_<preset>_*``; ``vits14`` is the smallest published scale (:data:`VSTEP_VITS14`;
  with ``--vstep-only --vstep-preset vits14 --vstep-compare --vstep-rounds 1
  --vstep-warmup 1`` a few minutes on 2 cores).

Usage: ``python benchmarks/value.py [--steps N] [--aligned K] [key=value ...]``
(config overrides on top of ``configs/smoke.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from timing import interleaved_rounds, ratio_summary, synchronize
from torch import Tensor

import dinov  # noqa: F401  (torchvision shim first)
from designers.config import ValueConfig
from designers.value import directional_derivative, grad_only_for
from designers.vision.value import backbone_aligned_parameters, designed_loss_derivative
from dinov.config import load_config
from dinov.data.masking import sample_block_masks
from dinov.train.meta_arch import SSLMetaArch
from dinov.train.task import Task

VARIANTS = ("exact", "fd", "fd_recompute", "fd_plain", "jvp", "train_step")
DEFAULTS = ["model.depth=8", "model.embed_dim=192", "model.num_heads=6", "data.batch_size=16",
            "head.out_dim=4096", "head.ibot_out_dim=4096", "head.hidden_dim=512",
            "head.bottleneck_dim=128"]


# the vstep ratios: the demo's data and crops with the fd benchmark's model (a 192-wide,
# 8-block ViT with 4096 prototypes: with the demo's 64-wide ViT the designer U-Net costs as
# much as the learner, which no real backbone does), 64 images a step.
# - recipe (the default): the per-GPU work of the full-scale recipes
#   (configs/vision/dinov2_vitl14.yaml on 32 GPUs: 32 images per GPU, V on 1 of them, a
#   meta batch of 32 inside the published 16-64; 2 head steps of 32 ADE20K + 32 NYUv2
#   images and a feedback meta batch of 32 + 32, shared by the 32 ranks), per 64 images:
#   V on 2, 2 head steps of 4 feedback images, a feedback meta batch of 4;
# - demo: the demo's feedback settings (5 head steps of 16, meta batch 16) and V on 16 of
#   the 64 images: 8x the published share of V and ~4x the recipe's feedback work.
VSTEP_MODEL = [o for o in DEFAULTS if not o.startswith("data.batch_size=")]  # the demo's 64 images
VSTEP_DEMO = [*VSTEP_MODEL, "value.batch_size=16"]
VSTEP_RECIPE = [*VSTEP_MODEL, "value.batch_size=2", "feedback.head_steps=2",
                "feedback.head_batch_size=4", "feedback.meta_batch_size=4"]
# the smallest published scale: a ViT-S/14 on 224/98-px crops (2 global + 2 local), 8 images
# a step (a CPU budget), V on 2 of them, 2 head steps of 8 feedback images at 224 px, a
# feedback meta batch of 8; a few minutes on 2 cores with --vstep-only --vstep-preset
# vits14 --vstep-compare --vstep-rounds 1 --vstep-warmup 1
VSTEP_VITS14 = [
    "model.arch=vit_small_patch14_dinov2", "model.img_size=224", "model.patch_size=14",
    "model.embed_dim=384", "model.depth=12", "model.num_heads=6",
    "crops.global_crops_size=224", "crops.local_crops_size=98", "crops.local_crops_number=2",
    "data.image_size=256", "data.num_samples=64", "data.batch_size=8",
    "head.out_dim=8192", "head.ibot_out_dim=8192", "head.hidden_dim=1024", "head.bottleneck_dim=256",
    "feedback.image_size=224", "feedback.synthetic_head_pool=32", "feedback.synthetic_meta_pool=16",
    "feedback.head_steps=2", "feedback.head_warmup_steps=2", "feedback.head_batch_size=8",
    "feedback.meta_batch_size=8", "value.batch_size=2"]
VSTEP_PRESETS = {"recipe": VSTEP_RECIPE, "demo": VSTEP_DEMO, "vits14": VSTEP_VITS14}


def build(overrides: list[str], aligned: int, device: torch.device
          ) -> tuple[Callable[[str], Tensor], int]:
    """A seeded student, task, targets and direction; returns ``run(variant) -> dφ``."""
    torch.manual_seed(0)
    cfg = load_config("configs/smoke.yaml", overrides)
    meta = SSLMetaArch(cfg).to(device)
    size, local = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n_local, batch = cfg.crops.local_crops_number, cfg.data.batch_size
    masks = sample_block_masks(2 * batch, meta.backbone.patch_grid(size, size), cfg.masks,
                               torch.Generator().manual_seed(0))
    images = torch.rand(2 * batch, 3, size, size)
    task = Task(images, images, torch.rand(n_local * batch, 3, local, local), masks, 2,
                n_local).to(device)
    targets = meta.teacher_targets(task, teacher_temp=0.04)
    params = backbone_aligned_parameters(meta.backbone, aligned)
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen).to(device) for p in params]

    def run(variant: str) -> Tensor:
        phi = torch.zeros(batch, device=device, requires_grad=True)
        scale_g = (1 + phi).repeat(2).view(-1, 1, 1, 1)
        scale_l = (1 + phi).repeat(n_local).view(-1, 1, 1, 1)
        designed = Task(task.student_global * scale_g, task.teacher_global,
                        task.local * scale_l, task.masks, 2, n_local)

        if variant == "train_step":
            meta.student_losses(designed, targets)["total"].backward()
            meta.zero_grad(set_to_none=True)
            return torch.zeros(batch)
        if variant == "fd_plain":  # fd over the whole student twice, for reference
            with grad_only_for(meta.student.parameters(), keep=params):
                value = directional_derivative(
                    lambda: meta.student_losses(designed, targets)["total"], params, direction)
        else:  # what the meta step runs (designers.vision.value.designed_task_value)
            method = "fd" if variant.startswith("fd") else variant
            cfg = ValueConfig(method=method, align_last_n_blocks=aligned,
                              recompute=variant == "fd_recompute")
            value = designed_loss_derivative(meta, designed, targets, params, direction, cfg)
        (grad,) = torch.autograd.grad(value, phi)
        return grad.detach().cpu()

    return run, batch


def peak_growth(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes of peak memory growth during ``fn`` (see the module docstring for CPU)."""
    if device.type == "cuda":
        synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return 1024.0 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)  # KiB on Linux


def memory_worker(args: argparse.Namespace) -> None:
    """One variant's designer gradient and peak memory, in a fresh process (max RSS never falls)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, _ = build(args.overrides, args.aligned, device)
    grad: list[Tensor] = []
    peak = peak_growth(lambda: grad.append(run(args.worker)), device)  # first call: the peak
    torch.save({"grad": grad[0], "peak": peak, "device": device.type,
                "threads": torch.get_num_threads()}, args.out)


def timing_worker(args: argparse.Namespace) -> None:
    """Every variant's seconds per round, the variants in turns (benchmarks/timing.py)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, _ = build(args.overrides, args.aligned, device)
    times = interleaved_rounds({v: (lambda v=v: run(v)) for v in VARIANTS}, args.steps)
    torch.save(times, args.out)


def _timed_stages(hook: object, trainer: object, totals: dict[str, float]) -> contextlib.ExitStack:
    """Patches that add each meta-step stage's (and the learner step's) wall time to
    ``totals`` while the returned context is open; everything is restored on exit."""
    import designers.vision.hook as hook_module

    def timed(owner: object, name: str, stage: str) -> contextlib.AbstractContextManager:
        inner = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            synchronize()  # on CUDA each stage is timed to its finished work
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            synchronize()
            totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start
            return out

        return mock.patch.object(owner, name, wrapper)

    stack = contextlib.ExitStack()
    for owner, name, stage in (
        (hook.heads, "fit", "heads_fit"),  # type: ignore[attr-defined]
        (hook_module, "downstream_gradient_and_loss", "g_down"),
        (hook_module, "downstream_loss", "calibration"),  # the hook's one other feedback forward
        (hook.core.designer, "design", "design"),  # type: ignore[attr-defined]
        (hook_module, "designed_task_value", "value"),
        (hook.core, "update", "designer_update"),  # type: ignore[attr-defined]
        (trainer, "learner_step", "learner_step"),
    ):
        stack.enter_context(timed(owner, name, stage))
    return stack


@contextlib.contextmanager
def vstep_trainer(config: str, overrides: list[str]) -> Iterator[tuple[Any, Any, Iterator[Tensor]]]:
    """A V-pretraining trainer of ``config`` + ``overrides`` in a temporary output dir, its
    designer hook and its batch stream."""
    from designers.vision.config import load_vconfig
    from designers.vision.hook import VisionDesignerHook
    from dinov.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_vconfig(config, [f"output_dir={tmp}", "probe.enabled=false",
                                    "train.plots=false", "train.progress=none", *overrides])
        torch.manual_seed(0)
        hook = VisionDesignerHook(cfg)
        trainer = Trainer(cfg, hooks=[hook])
        yield trainer, hook, trainer.stream.iterate(0)


def _steps(trainer: Any, batches: Iterator[Tensor], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            trainer.train_step(next(batches))
            trainer.step += 1
    return run


def vstep(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    """The whole V-pretraining step against the plain step at ``preset``'s settings: three
    trainers in one process, run in turns (plain, every 4, every 1; 4 steps each, a whole
    period of the every-4 schedule) for ``--vstep-rounds`` rounds; ratios are medians of
    the per-round ratios (benchmarks/timing.py)."""
    common = ["designer.burn_in=0", *VSTEP_PRESETS[preset], *args.vstep_overrides]
    plain = ["designer.kind=none", *common]
    designed = [f"designer.kind={args.vstep_designer}", *common]
    settings = {"plain": plain, "every4": [*designed, "designer.every=4"],
                "every1": [*designed, "designer.every=1"]}
    totals: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        runs = {}
        for name, overrides in settings.items():
            trainer, hook, batches = stack.enter_context(vstep_trainer(args.vstep_config, overrides))
            runs[name] = _steps(trainer, batches, 4)
            if name == "every1":  # where its time goes, patched around its own steps only
                every1 = runs[name]

                def staged(hook: Any = hook, trainer: Any = trainer, every1: Any = every1) -> None:
                    with _timed_stages(hook, trainer, totals):
                        every1()
                runs[name] = staged
        times = interleaved_rounds(runs, args.vstep_rounds, warmup=args.vstep_warmup)
    per_step = {name: [t / 4 for t in values] for name, values in times.items()}
    steps = 4 * (args.vstep_rounds + args.vstep_warmup)
    return {**ratio_summary("vstep_every1_over_dino", per_step["every1"], per_step["plain"],
                            at_least_one=True),
            **ratio_summary("vstep_every4_over_dino", per_step["every4"], per_step["plain"],
                            at_least_one=True),
            "vstep_dino_s": round(statistics.median(per_step["plain"]), 4),
            "vstep_every1_s": round(statistics.median(per_step["every1"]), 4),
            "vstep_every4_s": round(statistics.median(per_step["every4"]), 4),
            "vstep_every1_stage_ms": {k: round(1000 * v / steps, 1) for k, v in totals.items()},
            "vstep_rounds": args.vstep_rounds, "vstep_config": args.vstep_config,
            "vstep_preset": preset, "vstep_overrides": designed}


def vstep_line(args: argparse.Namespace) -> dict[str, Any]:
    """``--vstep-preset``'s ratios under the ``vstep_*`` keys; each ``--vstep-compare``
    preset's under ``vstep_<preset>_*``."""
    line = vstep(args, args.vstep_preset)
    for preset in args.vstep_compare:
        if preset != args.vstep_preset:
            other = vstep(args, preset)
            line.update({f"vstep_{preset}_{k.removeprefix('vstep_')}": v for k, v in other.items()
                         if k not in ("vstep_config", "vstep_preset")})
    return line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--aligned", type=int, default=2)
    parser.add_argument("--vstep-config", default="configs/vdemo.yaml",
                        help="V-pretraining config of the vstep_* ratios (the demo's)")
    parser.add_argument("--vstep-designer", default="mask")
    parser.add_argument("--vstep-rounds", type=int, default=8,
                        help="timed rounds (each: 4 steps of every setting, in turns)")
    parser.add_argument("--vstep-warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--vstep-preset", choices=sorted(VSTEP_PRESETS), default="recipe",
                        help="model/crop/feedback scale of the vstep ratios (see VSTEP_PRESETS)")
    parser.add_argument("--vstep-compare", nargs="*", choices=sorted(VSTEP_PRESETS),
                        default=["demo"], help="presets also measured, under vstep_<preset>_* keys")
    parser.add_argument("--vstep-only", action="store_true",
                        help="only the vstep ratios (skip the estimator comparison)")
    parser.add_argument("--vstep-overrides", nargs="*", default=[],
                        help="key=value overrides of the vstep config")
    parser.add_argument("--worker", choices=[*VARIANTS, "timing"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def estimator_line(args: argparse.Namespace) -> dict[str, Any]:
    """fd / jvp against exact: cosines, time ratios (one process, in turns) and memory
    ratios (one fresh process per variant: max RSS is per process and never falls)."""
    overrides = [*DEFAULTS, *args.overrides]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [*VARIANTS, "timing"]:
            out = os.path.join(tmp, f"{variant}.pt")
            subprocess.run([sys.executable, __file__, "--worker", variant, "--out", out,
                            "--steps", str(args.steps), "--aligned", str(args.aligned),
                            *overrides], check=True)
            results[variant] = torch.load(out, weights_only=True)
    times = results.pop("timing")
    ex = results["exact"]

    def cos(name: str) -> float:
        a, b = results[name]["grad"].flatten(), ex["grad"].flatten()
        return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)

    line = {"device": ex["device"], "threads": ex["threads"], "aligned_blocks": args.aligned,
            "overrides": overrides}
    for name in ("fd", "fd_recompute", "fd_plain", "jvp"):
        line[f"{name}_vs_exact_cos"] = cos(name)
        line.update(ratio_summary(f"{name}_time_ratio", times[name], times["exact"]))
        line[f"{name}_mem_ratio"] = round(results[name]["peak"] / max(ex["peak"], 1.0), 4)
        # not flagged below 1: the estimators freeze the weights outside θ_S, so they skip
        # weight gradients a training step computes (fd runs below one training step)
        line.update(ratio_summary(f"{name}_over_train_step", times[name], times["train_step"]))
    line.update(ratio_summary("exact_over_train_step", times["exact"], times["train_step"]))
    for name, r in results.items():
        line[f"{name}_s"] = round(statistics.median(times[name]), 4)
        line[f"{name}_peak_mib"] = round(r["peak"] / 2**20, 1)
    return line


def main() -> None:
    args = parse_args()
    if args.worker == "timing":
        timing_worker(args)
        return
    if args.worker:
        memory_worker(args)
        return
    line: dict[str, Any] = {"benchmark": "value"}
    if not args.vstep_only:
        line.update(estimator_line(args))
    line.update(vstep_line(args))
    print(json.dumps(line))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
