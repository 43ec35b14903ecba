"""The learner's training loop: data -> task -> losses -> AdamW step -> EMA, with logging,
checkpoints, exact resume, online probes and plots.

A run writes to ``output_dir``: ``config.yaml``, ``metrics.jsonl`` (one JSON object per
logged step, and per step a hook reported values), ``results.json``, ``checkpoints/``,
PNG plots and, with ``log.tensorboard=true``, TensorBoard events of the same rows.
Designers plug in through ``hooks`` (see :mod:`dinov.train.task`).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dinov.checkpoint import (
    atomic_write_text,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dinov.config import Config, ConfigError, save_config, to_yaml
from dinov.distributed import (
    agree_step,
    all_reduce_mean,
    barrier,
    checkpoint_format,
    gather_objects,
    init_distributed,
    load_model_state_dict,
    load_optimizer_state_dict,
    load_sharded_model_and_optimizer,
    model_state_dict,
    optimizer_state_dict,
    rank_rng_state,
    sharded_model_and_optimizer,
    uses_fsdp,
    wrap_model,
)
from dinov.plots import plot_run
from dinov.preemption import StopRequests, stopped_results
from dinov.runs import (
    NonFiniteSteps,
    read_metrics,
    remove_stale_temporaries,
    resume_from_newest,
    truncate_metrics,
)
from dinov.sharded import save_sharded
from dinov.train.data import BatchStream, build_pretraining_dataset
from dinov.train.meta_arch import SSLMetaArch
from dinov.train.optim import apply_schedule, build_optimizer
from dinov.train.probe import OnlineProbe
from dinov.train.schedules import build_schedules
from dinov.train.task import LearnerContext, MultiCropTaskBuilder, StepContext, StepHook, Task

log = logging.getLogger("dinov.train")


def per_rank_lists(per_rank: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every rank's own state (``Trainer._rank_state``, rank order) as the single file's
    ``*_per_rank`` lists."""
    return {"rng_per_rank": [r["rng"] for r in per_rank],
            "pending_per_rank": [r["pending"] for r in per_rank],
            "skipped_per_rank": [r["skipped"] for r in per_rank]}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, hooks: Sequence[StepHook] = ()) -> None:
        self.cfg = cfg
        self.env, self.device = init_distributed(cfg.dist)
        seed_everything(cfg.train.seed + self.env.rank)
        self.output_dir = pathlib.Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.model = SSLMetaArch(cfg).to(self.device)
        # wrap (DDP/FSDP) before the optimizer: FSDP replaces the parameters by shards
        wrap_model(self.model.student, self.model.teacher, cfg.dist, self.device)
        self.optimizer = build_optimizer(self.model.student, self.model.num_blocks, cfg.optim)
        self.schedules = build_schedules(cfg)
        grid = self.model.backbone.patch_grid(cfg.crops.global_crops_size, cfg.crops.global_crops_size)
        self.task_builder = MultiCropTaskBuilder(cfg, grid)
        self.hooks = list(hooks)
        if len({hook.name for hook in self.hooks}) != len(self.hooks):
            raise ValueError(f"hooks need distinct names, got {[h.name for h in self.hooks]}")
        dataset = build_pretraining_dataset(cfg.data)
        self.stream = BatchStream(dataset, cfg.data, self.env.rank, self.env.world_size)
        # under FSDP the probe's teacher forwards are collectives: every rank runs them
        probe_here = self.env.is_main or uses_fsdp(cfg.dist)
        self.probe = OnlineProbe(cfg) if cfg.probe.enabled and probe_here else None
        self.step = 0
        # skipped parts (learner steps, meta steps), by part: one counter, one stop rule
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
        self.history: dict[str, Any] = {}
        # losses of the steps since the last log row: checkpointed, so that the first row
        # after a resume (and results.json's final_loss) equal an uninterrupted run's
        self.pending: list[dict[str, torch.Tensor]] = []
        self._clock: tuple[float, float] = (0.0, time.perf_counter())  # (seconds before, start)
        self._hook_values: dict[str, float] = {}  # this step's, for its metrics row
        self._tensorboard: Any = None
        self.sharded = checkpoint_format(cfg.checkpoint.format, cfg.dist) == "dcp"
        # a signal or the save clock: saved at the step all ranks agree on (dinov.preemption)
        self.stop_requests = StopRequests(cfg.train.preempt_signals, cfg.train.save_every_minutes)
        self.learner = LearnerContext(model=self.model, device=self.device, rank=self.env.rank,
                                      world_size=self.env.world_size, fsdp=uses_fsdp(cfg.dist),
                                      record_nonfinite=self.record_nonfinite)
        for hook in self.hooks:  # before any resume: hooks own what they build from here on
            hook.setup(self.learner)

    # ----- state -----------------------------------------------------------------------
    def _common_state(self) -> dict[str, Any]:
        """What every rank holds alike (rank 0's copy is written)."""
        return {
            "step": self.step,
            "config": to_yaml(self.cfg),  # lets eval rebuild the backbone from the file alone
            "trainer": type(self.cfg).TRAINER,  # the entry point that can resume it
            # how the loaded weights resize positions (model.pos_interp=auto resolved), so
            # the checkpoint evaluates the way the run trained
            "pos_interp": self.model.backbone.pos_interp,
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
            "rng": rng_state(),
            "nonfinite": self.nonfinite.state_dict(),
            "history": {**self.history, "train_seconds": self.train_seconds()},
        }

    def _rank_state(self) -> dict[str, Any]:
        """This rank's own: its RNG stream, its pending losses (the log row averages every
        rank's), its skipped-image count."""
        return {"rng": rng_state(), "pending": [{k: v.cpu() for k, v in p.items()} for p in self.pending],
                "skipped": self.stream.skipped_images}

    def state_dict(self) -> dict[str, Any]:
        """The single-file checkpoint; a collective under DDP/FSDP (full state dicts,
        every rank's own state)."""
        return {
            **self._common_state(),
            "model": model_state_dict(self.model),  # full and wrapper-free under DDP/FSDP
            "optimizer": optimizer_state_dict(self.model, self.optimizer),
            **per_rank_lists(gather_objects(self._rank_state())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sharded_path" in state:  # dinov.sharded: reshards to this run's world size
            load_sharded_model_and_optimizer(state["sharded_path"], self.model, self.optimizer)
            state = {**state, **per_rank_lists(state["per_rank"])}
        else:
            load_model_state_dict(self.model, state["model"])
            load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        hook_states = state["hooks"]
        if set(hook_states) != {hook.name for hook in self.hooks}:
            raise ValueError(f"the checkpoint holds the states of hooks {sorted(hook_states)}, "
                             f"this run has {sorted(h.name for h in self.hooks)}")
        for hook in self.hooks:
            hook.load_state_dict(hook_states[hook.name])
        set_rng_state(rank_rng_state(state, self.env))
        self.step = state["step"]
        self.nonfinite.load_state_dict(state["nonfinite"])
        self.history = state.get("history", {})
        self._clock = (self.history.get("train_seconds", 0.0), time.perf_counter())
        self.pending = self._this_ranks(state, "pending_per_rank", [])
        self.stream.skipped_images = self._this_ranks(state, "skipped_per_rank", 0)

    def _this_ranks(self, state: dict[str, Any], key: str, default: Any) -> Any:
        per_rank = state.get(key)
        if per_rank is not None and len(per_rank) == self.env.world_size:
            return per_rank[self.env.rank]
        if per_rank is not None:
            log.warning("checkpoint written by %d ranks, resumed on %d: its %s are not restored",
                        len(per_rank), self.env.world_size, key)
        return default

    def train_seconds(self) -> float:
        """Wall seconds of training over every process of this run (resumes add up)."""
        before, start = self._clock
        return before + time.perf_counter() - start

    def _maybe_resume(self) -> None:
        """Continue from the newest readable checkpoint, once its config is accepted."""
        if not self.cfg.train.resume:
            return
        path = resume_from_newest(self.checkpoint_dir, self.cfg, self.load_state_dict)
        if path is None:
            return
        if self.env.is_main:
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)
        if self.cfg.model.weights:  # one command serves the first launch and every requeue
            log.info("the checkpoint wins over model.weights=%s (the weights of a first launch)",
                     self.cfg.model.weights)

    def save(self) -> pathlib.Path | None:
        """A sharded checkpoint (every rank writes its shards), or the single file (every
        rank gathers, rank 0 writes); all ranks wait until it is in place."""
        path = None
        if self.sharded:
            path = save_sharded(self.checkpoint_dir, self.step,
                                sharded_model_and_optimizer(self.model, self.optimizer),
                                self._common_state(), self._rank_state(), self.env.rank,
                                self.cfg.train.keep_last)
        else:
            state = self.state_dict()
            if self.env.is_main:
                path = save_checkpoint(self.checkpoint_dir, self.step, state, self.cfg.train.keep_last)
            barrier()  # a rank that resumes or stops next must find the file complete
        self.stop_requests.saved()
        return path

    # ----- one step --------------------------------------------------------------------
    def build_task(self, images: torch.Tensor) -> Task:
        return self.task_builder(images.to(self.device, non_blocking=True))

    def train_step(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Build the task (through the hooks), then one learner step on its detached views."""
        sched = self.schedules.at(self.step)
        ctx = StepContext(step=self.step, learner=self.learner, schedule=sched)
        task = self.build_task(images)
        for hook in self.hooks:
            task = hook.before_step(ctx, images, task)
        losses = self.learner_step(task.detached(), sched)
        self._hook_values = {}
        if losses is not None:
            for hook in self.hooks:
                values = hook.after_step(ctx, task, losses)
                self._hook_values.update({f"{hook.name}/{k}": v for k, v in values.items()})
        return losses

    def learner_step(self, task: Task, sched: dict[str, float]) -> dict[str, torch.Tensor] | None:
        """SSL loss -> AdamW step -> EMA teacher -> centers; None when the loss was not finite."""
        apply_schedule(self.optimizer, sched["lr"], sched["weight_decay"], sched["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        losses, targets = self.model(task, sched["teacher_temp"])
        # the one sync per step: needed to skip; agreed by all ranks, or DDP/FSDP would
        # hang. The stop and save requests ride on it (no extra collective).
        finite, stop, save = agree_step(losses["total"], *self.stop_requests.local())
        self.stop_requests.agreed(stop, save)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.record_nonfinite("learner loss")
            return None
        losses["total"].backward()
        self._clip_gradients()
        self.optimizer.step()
        self.model.update_teacher(sched["momentum"])
        self.model.update_centers(targets)
        return {k: v.detach() for k, v in losses.items()}

    def _clip_gradients(self) -> None:
        if self.cfg.optim.clip_grad <= 0:
            return
        for module in self.model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad, foreach=True)

    def record_nonfinite(self, part: str) -> None:
        """Count a step whose ``part`` (``learner loss``, a hook's meta step, ...) was not
        finite and was skipped; more than ``train.max_nonfinite_steps`` stop the run."""
        self.nonfinite.record(part, self.step)

    # ----- the loop --------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, row["step"])

    def _open_tensorboard(self) -> Any:
        """The TensorBoard writer of ``log.tensorboard=true`` (rank 0), or None.

        ``purge_step``: a resumed run drops the events an interrupted one wrote after its
        checkpoint, as metrics.jsonl drops those rows.
        """
        if not (self.cfg.log.tensorboard and self.env.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ConfigError("log.tensorboard=true needs the tensorboard package: "
                              "pip install 'vpretrain[tensorboard]'") from error
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=self.step + 1)

    def _probe(self) -> dict[str, float]:
        if self.probe is None:
            return {}
        return self.probe.evaluate(self.model.teacher["backbone"])

    def _progress(self, start: int, stop: int):
        mode = self.cfg.train.progress
        use_tqdm = mode == "tqdm" or (mode == "auto" and sys.stderr.isatty())
        if use_tqdm and self.env.is_main:
            return tqdm(range(start, stop), initial=start, total=stop, desc="train", dynamic_ncols=True)
        return range(start, stop)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir)
        self._maybe_resume()
        if self.env.is_main:  # only once the resume is accepted: it must match the checkpoints
            save_config(cfg, self.output_dir / "config.yaml")
        finished = self._results_of_finished_run()
        if finished is not None:
            return finished
        self._tensorboard = self._open_tensorboard()
        try:
            with self.stop_requests:
                results = self._train()
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
        if "preempted_at_step" in results:
            self.stop_requests.requeue(self.env.is_main)  # submitit's handler may exit here
        return results

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.step == 0 and "probe_init" not in self.history:
            self.history["probe_init"] = self._probe()
        stop = min(cfg.train.steps, cfg.train.stop_at_step or cfg.train.steps)
        batches = self.stream.iterate(self.step)
        self._clock = (self.history.get("train_seconds", 0.0), time.perf_counter())
        bar = self._progress(self.step, stop)
        for _ in bar:
            losses = self.train_step(next(batches))
            if losses is not None:
                self.pending.append(losses)
            self.step += 1
            self._after_step(bar)
            if self.stop_requests.stop:
                log.info("saved step %d and stopping: %s", self.step, self.stop_requests.describe())
                break
        self.history["train_seconds"] = self.train_seconds()
        if self.step >= cfg.train.steps:
            return self._finish()
        return stopped_results(self.step, self.stop_requests)

    def _results_of_finished_run(self) -> dict[str, Any] | None:
        """A resumed run that had already finished: its results.json, untouched."""
        path = self.output_dir / "results.json"
        if self.step < self.cfg.train.steps or not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # written partially by an older version: write it again
        log.info("the run in %s had finished at step %d: results.json kept", self.output_dir, self.step)
        return results

    def _after_step(self, bar: Any) -> None:
        cfg, step = self.cfg, self.step
        row: dict[str, Any] = {}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            row = self._loss_row(self.pending)
            self.pending.clear()
            if isinstance(bar, tqdm):
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
            elif self.env.is_main and cfg.train.progress != "none":
                log.info("step %d/%d loss %.4f", step, cfg.train.steps, row.get("loss", float("nan")))
        if cfg.probe.every > 0 and step % cfg.probe.every == 0 and step < cfg.train.steps:
            row.update(self._probe())
        row.update(self._hook_values)  # e.g. a meta step's V and calibration pair
        if row:
            self._log({"step": step, **row})
        requested = self.stop_requests.stop or self.stop_requests.save
        if step % cfg.train.checkpoint_every == 0 or step in (cfg.train.steps, cfg.train.stop_at_step) or requested:
            self.save()

    def _loss_row(self, pending: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        sched = self.schedules.at(self.step - 1)
        skipped = float(self.stream.skipped_images)
        if self.env.world_size > 1:
            skipped = float(all_reduce_mean(torch.tensor(skipped))) * self.env.world_size
        row: dict[str, Any] = {"lr": sched["lr"], "momentum": sched["momentum"],
                               "teacher_temp": sched["teacher_temp"], "nonfinite_steps": self.nonfinite.total,
                               "skipped_images": int(round(skipped))}
        if pending:
            # mean over ranks too (ranks skip steps together, so all have the same rows)
            stacked = {k: all_reduce_mean(torch.stack([p[k] for p in pending]).mean()).item()
                       for k in pending[0]}
            row.update({"loss": stacked.pop("total"), **stacked})
        return row

    def _finish(self) -> dict[str, Any]:
        final_probe = self._probe()
        # only rank 0 reads: another rank could see a line rank 0 is still writing
        rows = read_metrics(self.output_dir / "metrics.jsonl") if self.env.is_main else []
        losses = [r["loss"] for r in rows if "loss" in r]
        results: dict[str, Any] = {
            "steps": self.step,
            "final_loss": losses[-1] if losses else None,
            "first_logged_loss": losses[0] if losses else None,
            "nonfinite_steps": self.nonfinite.total,
            "nonfinite_parts": dict(self.nonfinite.parts),
            "skipped_images": rows[-1].get("skipped_images", 0) if rows else 0,
            "train_seconds": round(self.history.get("train_seconds", 0.0), 2),
            "probe_top1_init": self.history.get("probe_init", {}).get("probe_top1"),
            "probe_top1_final": final_probe.get("probe_top1"),
            **{k: v for hook in self.hooks for k, v in hook.summary().items()
               if not (isinstance(v, float) and math.isnan(v))},
        }
        if self.env.is_main:
            atomic_write_text(self.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
            if self.cfg.train.plots:
                plot_run(self.output_dir)
        return results
