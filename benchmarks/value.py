"""Value-estimator benchmark: fd and jvp against exact, on a DINO/iBOT student.

Prints one JSON line. Each variant is one designer-gradient evaluation: V along a fixed
random unit direction in the aligned parameters (last ``--aligned`` blocks + final norm),
then ``autograd.grad(V, φ)`` for a per-image brightness designer φ, with precomputed
teacher targets. ``train_step`` is the learner's forward + backward of the same loss (no
optimizer), the yardstick the design aims at ("a designer step costs little more than
one training step").

- ``fd_split``: fd with the trunk (blocks below the aligned set) run once
  (:func:`designers.value.directional_derivative_split`), the design's speed trick.
- ``*_cos``: cosine of the designer gradient against ``exact``.
- ``*_time_ratio``: median wall time over ``exact``'s (and ``*_over_train_step``).
- ``*_mem_ratio``: peak memory over ``exact``'s. On CUDA: ``torch.cuda.max_memory_allocated``
  growth during one evaluation. On CPU there is no allocator counter, so every variant runs
  in its own fresh subprocess and the peak is the growth of the process's max RSS
  (``resource.getrusage``) over one evaluation, measured before any other evaluation ran
  there; it includes allocator slack, so treat CPU ratios as approximate.

Usage: ``python benchmarks/value.py [--steps N] [--aligned K] [key=value ...]``
(config overrides on top of ``configs/smoke.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import Tensor

import dinov  # noqa: F401  (torchvision shim first)
from designers.value import (
    aligned_parameters,
    directional_derivative,
    directional_derivative_split,
)
from dinov.config import load_config
from dinov.data.masking import sample_block_masks
from dinov.models.backbone import TokenState
from dinov.train.meta_arch import SSLMetaArch, TeacherTargets
from dinov.train.task import Task

VARIANTS = ("exact", "fd", "fd_split", "jvp", "train_step")
DEFAULTS = ["model.depth=8", "model.embed_dim=192", "model.num_heads=6", "data.batch_size=16",
            "head.out_dim=4096", "head.ibot_out_dim=4096", "head.hidden_dim=512",
            "head.bottleneck_dim=128"]


def split_losses(meta: SSLMetaArch, task: Task, targets: TeacherTargets, start: int
                 ) -> tuple[Callable[[], tuple[TokenState, TokenState]],
                            Callable[[tuple[TokenState, TokenState]], Tensor]]:
    """``student_losses(task, targets)["total"]`` cut at block ``start`` (fp32 only).

    Mirrors :meth:`SSLMetaArch.student_losses` with the backbone run in stages, so the
    trunk (blocks below the aligned set) runs once per designer step.
    """
    backbone, loss_cfg = meta.backbone, meta.cfg.loss

    def trunk() -> tuple[TokenState, TokenState]:
        glob = backbone.prepare_tokens(task.student_global, task.masks.masks)
        return (backbone.run_blocks(glob, 0, start),
                backbone.run_blocks(backbone.prepare_tokens(task.local), 0, start))

    def head(states: tuple[TokenState, TokenState]) -> Tensor:
        glob, loc = (backbone.finalize(backbone.run_blocks(s, start)) for s in states)
        masked = glob.patch.flatten(0, 1)[task.masks.indices]
        dino_logits, ibot_logits = meta._heads(meta.student, torch.cat([glob.cls, loc.cls]),
                                               masked)
        n_crops = task.n_global + task.n_local
        dino = meta.dino_loss(dino_logits.unflatten(0, (n_crops, -1)), targets.dino_probs,
                              n_global=task.n_global)
        ibot = meta.ibot_loss(ibot_logits, targets.ibot_probs, task.masks.weights)
        koleo = sum(meta.koleo_loss(c.float()) for c in glob.cls.chunk(task.n_global))
        return (loss_cfg.dino_loss_weight * dino + loss_cfg.ibot_loss_weight * ibot
                + loss_cfg.koleo_loss_weight * koleo)

    return trunk, head


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
    params = aligned_parameters(meta.backbone, aligned)
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen).to(device) for p in params]

    def run(variant: str) -> Tensor:
        phi = torch.zeros(batch, device=device, requires_grad=True)
        scale_g = (1 + phi).repeat(2).view(-1, 1, 1, 1)
        scale_l = (1 + phi).repeat(n_local).view(-1, 1, 1, 1)
        designed = Task(task.student_global * scale_g, task.teacher_global,
                        task.local * scale_l, task.masks, 2, n_local)

        def fn() -> Tensor:
            return meta.student_losses(designed, targets)["total"]

        if variant == "fd_split":
            trunk, head = split_losses(meta, designed, targets, meta.num_blocks - aligned)
            value = directional_derivative_split(trunk, head, params, direction)
            (grad,) = torch.autograd.grad(value, phi)
            return grad.detach().cpu()
        if variant == "train_step":
            fn().backward()
            meta.zero_grad(set_to_none=True)
            return torch.zeros(batch)
        value = directional_derivative(fn, params, direction, method=variant,
                                       module=meta.student)
        (grad,) = torch.autograd.grad(value, phi)
        meta.zero_grad(set_to_none=True)  # exact's backward also reaches the params
        return grad.detach().cpu()

    return run, batch


def peak_growth(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes of peak memory growth during ``fn`` (see the module docstring for CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return 1024.0 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run, _ = build(args.overrides, args.aligned, device)
    grad: list[Tensor] = []
    peak = peak_growth(lambda: grad.append(run(args.worker)), device)  # first call: the peak
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(args.worker)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.save({"grad": grad[0], "time": statistics.median(times), "peak": peak,
                "device": device.type, "threads": torch.get_num_threads()}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--aligned", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    overrides = [*DEFAULTS, *args.overrides]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:  # fresh processes: max RSS is per process and never falls
            out = os.path.join(tmp, f"{variant}.pt")
            subprocess.run([sys.executable, __file__, "--worker", variant, "--out", out,
                            "--steps", str(args.steps), "--aligned", str(args.aligned),
                            *overrides], check=True)
            results[variant] = torch.load(out)
    ex = results["exact"]

    def cos(name: str) -> float:
        a, b = results[name]["grad"].flatten(), ex["grad"].flatten()
        return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)

    line = {"benchmark": "value", "device": ex["device"], "threads": ex["threads"],
            "aligned_blocks": args.aligned, "overrides": overrides}
    for name in ("fd", "fd_split", "jvp"):
        r = results[name]
        line[f"{name}_vs_exact_cos"] = cos(name)
        line[f"{name}_time_ratio"] = round(r["time"] / ex["time"], 4)
        line[f"{name}_mem_ratio"] = round(r["peak"] / max(ex["peak"], 1.0), 4)
        line[f"{name}_over_train_step"] = round(r["time"] / results["train_step"]["time"], 4)
    line["exact_over_train_step"] = round(ex["time"] / results["train_step"]["time"], 4)
    for name, r in results.items():
        line[f"{name}_s"] = round(r["time"], 4)
        line[f"{name}_peak_mib"] = round(r["peak"] / 2**20, 1)
    print(json.dumps(line))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
