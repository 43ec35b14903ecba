"""Continued pretraining of a causal LM: ``python -m designers.lm.train --config FILE key=value``.

:class:`LMTrainer` owns the loop: packed sequences (:mod:`designers.lm.data`) -> the
model's next-token loss on the answer tokens -> AdamW with warm-up and cosine decay,
gradient clipping and accumulation, fp32 or bf16 autocast; one process, DDP, or FSDP2
with every decoder layer sharded (``dist.strategy=fsdp``; checkpoints are then sharded and
``final/`` is written from the gathered weights); gloo on a CPU, NCCL on GPUs. A run
writes to ``output_dir`` what the vision trainer writes: ``config.yaml``,
``metrics.jsonl``, ``results.json``, ``checkpoints/`` (atomic single files, or sharded
directories through DCP; exact resume of the weights that train, the optimizer, the
schedule position, every RNG and the data stream's position) and, at the end, ``final/``:
a ``save_pretrained`` directory that ``transformers``, lm-evaluation-harness and vLLM load
as it is (with LoRA the merged model, or the adapter alone with ``export.merge_lora=false``).

The loss of a step is the sum of every answer token's cross-entropy over the global
batch divided by the global batch's count of answer tokens, computed on every rank from
the same packed batch, so a run on several processes takes the step one process takes
at the same global batch (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import shutil
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import dinov  # noqa: F401  (torchvision shim first: transformers imports torchvision)
from designers.lm.config import LMConfig
from designers.lm.data import IGNORE_INDEX, PackedStream, label_count, read_corpus, rows_of_rank
from dinov.checkpoint import (
    atomic_write_text,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dinov.cli import exit_on_run_error, parse_config, setup_logging
from dinov.config import ConfigError, save_config, to_yaml
from dinov.distributed import (
    agree_step,
    all_reduce_mean,
    barrier,
    broadcast_module,
    checkpoint_format,
    gather_objects,
    init_distributed,
    is_distributed,
    rank_rng_state,
    uses_fsdp,
)
from dinov.preemption import StopRequests, stopped_results
from dinov.runs import (
    NonFiniteSteps,
    read_metrics,
    remove_stale_temporaries,
    resume_from_newest,
    truncate_metrics,
)
from dinov.sharded import load_tensors, save_sharded
from eval.lm import apply_lora, check_positions, load_causal_lm, trainable_state

log = logging.getLogger("designers.lm.train")


def use_synthetic_default(cfg: LMConfig, is_main: bool) -> None:
    """With ``synthetic.dir``: the tiny offline default written there once (by rank 0),
    and its model and corpus used where ``model.path`` / ``data.path`` are not set."""
    if cfg.synthetic.dir is None:
        return
    from designers.lm.synthetic import write_default

    root = pathlib.Path(cfg.synthetic.dir)
    marker = root / "written.json"
    if is_main and not marker.is_file():
        paths = write_default(root, seed=cfg.synthetic.seed)
        atomic_write_text(marker, json.dumps({k: str(v) for k, v in paths.items()}) + "\n")
    barrier()
    cfg.model.path = cfg.model.path or str(root / "model")
    cfg.data.path = cfg.data.path or str(root / "numina.jsonl")


def learning_rate(cfg: LMConfig, step: int) -> float:
    """Linear warm-up to ``optim.lr``, then cosine decay to ``min_lr_ratio``·lr."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: nn.Module, cfg: LMConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that train; no weight decay on biases and norms (1-D)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                             betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def token_loss_sum(model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
    """Summed next-token cross-entropy of the answer tokens of ``batch`` (fp32)."""
    autocast = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")
    with autocast:
        # no attention mask, no cache: restarting position_ids make the mask block-diagonal
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class LMTrainer:
    """One continued-pretraining run (module docstring)."""

    def __init__(self, cfg: LMConfig) -> None:
        self.cfg = cfg
        self.env, self.device = init_distributed(cfg.dist)
        use_synthetic_default(cfg, self.env.is_main)
        torch.manual_seed(cfg.train.seed + self.env.rank)  # dropout differs per rank
        self.output_dir = pathlib.Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        model, self.tokenizer = load_causal_lm(cfg.model)
        check_positions(model, cfg.data.seq_len)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        self.model = model.to(self.device).train()
        self.fsdp = uses_fsdp(cfg.dist)
        self.ddp = is_distributed() and not self.fsdp and cfg.dist.strategy != "none"
        self.wrapped: nn.Module = self.model
        if self.fsdp:  # before the optimizer: fully_shard replaces the parameters
            broadcast_module(self.model)  # LoRA's random init differs per rank (seed + rank)
            shard_decoder_layers(self.model, self.device)
        elif self.ddp:
            self.wrapped = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.stream = PackedStream(read_corpus(cfg.data.path), self.tokenizer, cfg.data,
                                   str(cfg.data.path))
        self.step = 0
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
        self.pending: list[float] = []  # step losses since the last log row (checkpointed)
        self.history: dict[str, Any] = {"train_seconds": 0.0}
        self._clock = time.perf_counter()
        # a signal or the save clock: saved at the step all ranks agree on (dinov.preemption)
        self.stop_requests = StopRequests(cfg.train.preempt_signals, cfg.train.save_every_minutes)
        self.sharded = checkpoint_format(cfg.checkpoint.format, cfg.dist) == "dcp"
        if self.fsdp and not self.sharded:
            raise ConfigError("checkpoint.format=file with dist.strategy=fsdp: the LM trainer "
                              "writes sharded checkpoints under FSDP (checkpoint.format=dcp or auto)")

    # ----- one step ------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimizer step on the next global batch; its loss, or None when skipped."""
        cfg = self.cfg.train
        micro, world = cfg.micro_batch_size, self.env.world_size
        batch = self.stream.next_batch(micro * cfg.grad_accum * world)
        tokens = max(label_count(batch), 1)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        parts = rows_of_rank(batch, self.env.rank, world, micro)
        total = torch.zeros((), device=self.device)
        for i, part in enumerate(parts):
            part = {k: v.to(self.device) for k, v in part.items()}
            last = i == len(parts) - 1
            if self.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = self.wrapped.no_sync() if self.ddp and not last else contextlib.nullcontext()
            with sync:
                loss_sum = token_loss_sum(self.wrapped, part, cfg.precision)
                # DDP / FSDP average gradients over ranks: x world makes them the global mean
                (loss_sum * (world / tokens)).backward()
            total += loss_sum.detach()
        # the step's one agreement: finite on all ranks, with the stop / save requests
        finite, stop, save = agree_step(total, *self.stop_requests.local())
        self.stop_requests.agreed(stop, save)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite.record("learner loss", self.step)
            return None
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(all_reduce_mean(total)) * world / tokens

    # ----- state -----------------------------------------------------------------------
    def _common_state(self) -> dict[str, Any]:
        """What every rank holds alike (rank 0's copy is written)."""
        return {
            "step": self.step, "config": to_yaml(self.cfg), "trainer": LMConfig.TRAINER,
            "stream": self.stream.state_dict(), "rng": rng_state(),
            "nonfinite": self.nonfinite.state_dict(), "pending": list(self.pending),
            "history": {**self.history, "train_seconds": self._seconds()},
        }

    def state_dict(self) -> dict[str, Any]:
        """The single-file checkpoint (a collective: every rank's RNG)."""
        return {**self._common_state(),
                "model": {k: v.detach().cpu() for k, v in trainable_state(self.model).items()},
                "optimizer": self.optimizer.state_dict(), "rng_per_rank": gather_objects(rng_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sharded_path" in state:  # dinov.sharded: any world size
            self._load_sharded(state)
            state = {**state, "rng_per_rank": [r["rng"] for r in state["per_rank"]]}
        else:
            expected = trainable_state(self.model)
            if set(state["model"]) != set(expected):
                raise ValueError(f"the checkpoint's weights ({len(state['model'])}) are not this "
                                 f"model's trainable ones ({len(expected)})")
            with torch.no_grad():
                self.model.load_state_dict(state["model"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(rank_rng_state(state, self.env))
        self.nonfinite.load_state_dict(state["nonfinite"])
        self.step, self.pending = int(state["step"]), list(state["pending"])
        self.history = dict(state["history"])
        self._clock = time.perf_counter()

    def _sharded_tensors(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # the trainable weights only (LoRA: the adapters; the base comes from model.path)
        return {"model": trainable_state(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def _load_sharded(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        template = self._sharded_tensors()  # model: views of the parameters, loaded in place
        load_tensors(state["sharded_path"], template)
        set_optimizer_state_dict(self.model, self.optimizer, template["optimizer"])

    def _seconds(self) -> float:
        return self.history["train_seconds"] + time.perf_counter() - self._clock

    def save(self) -> None:
        """A sharded checkpoint (``checkpoint.format=dcp``) or the single file; every rank
        takes part and all wait until it is in place."""
        if self.sharded:
            save_sharded(self.checkpoint_dir, self.step, self._sharded_tensors(), self._common_state(),
                         {"rng": rng_state()}, self.env.rank, self.cfg.train.keep_last)
        else:
            state = self.state_dict()  # a collective (every rank's RNG)
            if self.env.is_main:
                save_checkpoint(self.checkpoint_dir, self.step, state, self.cfg.train.keep_last)
            barrier()
        self.stop_requests.saved()

    def _maybe_resume(self) -> None:
        if not self.cfg.train.resume:
            return
        path = resume_from_newest(self.checkpoint_dir, self.cfg, self.load_state_dict)
        if path is None:
            return
        if self.env.is_main:
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # ----- the loop --------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.train
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir)
        self._maybe_resume()
        if self.env.is_main:  # only once a resume is accepted
            save_config(self.cfg, self.output_dir / "config.yaml")
        with self.stop_requests:
            self._train(min(cfg.steps, cfg.stop_at_step or cfg.steps))
        if self.step < cfg.steps:
            results = stopped_results(self.step, self.stop_requests)
            if "preempted_at_step" in results:
                self.stop_requests.requeue(self.env.is_main)  # submitit's handler may exit here
            return results
        return self._finish()

    def _train(self, stop: int) -> None:
        for _ in self._progress(self.step, stop):
            loss = self.train_step()
            if loss is not None:
                self.pending.append(loss)
            self.step += 1
            self._after_step()
            if self.stop_requests.stop:
                log.info("saved step %d and stopping: %s", self.step, self.stop_requests.describe())
                break

    def _after_step(self) -> None:
        cfg, step = self.cfg.train, self.step
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": learning_rate(self.cfg, step - 1),
                   "nonfinite_steps": self.nonfinite.total, **self.stream.stats}
            if self.pending:
                row["loss"] = sum(self.pending) / len(self.pending)
            self.pending.clear()
            if self.env.is_main:
                with open(self.output_dir / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                if cfg.progress in ("log", "auto") and not sys.stderr.isatty():
                    log.info("step %d/%d loss %.4f", step, cfg.steps, row.get("loss", math.nan))
        requested = self.stop_requests.stop or self.stop_requests.save
        if step % cfg.checkpoint_every == 0 or step in (cfg.steps, cfg.stop_at_step) or requested:
            self.save()

    def _progress(self, start: int, stop: int) -> Any:
        mode = self.cfg.train.progress
        if self.env.is_main and (mode == "tqdm" or (mode == "auto" and sys.stderr.isatty())):
            return tqdm(range(start, stop), initial=start, total=stop, desc="train")
        return range(start, stop)

    def _finish(self) -> dict[str, Any]:
        seconds = self._seconds()
        rows = read_metrics(self.output_dir / "metrics.jsonl") if self.env.is_main else []
        losses = [r["loss"] for r in rows if "loss" in r]
        results = {"steps": self.step, "final_loss": losses[-1] if losses else None,
                   "first_logged_loss": losses[0] if losses else None,
                   "nonfinite_steps": self.nonfinite.total,
                   "nonfinite_parts": dict(self.nonfinite.parts), **self.stream.stats,
                   "train_seconds": round(seconds, 2),
                   # packed (non-padding) tokens, every process of the run counted once
                   "tokens_per_second": round(self.stream.stats["tokens"] / max(seconds, 1e-9), 1),
                   "final": str(self.output_dir / "final")}
        model = self.model
        if self.fsdp:  # the full weights (a collective) in a plain copy on rank 0
            model = unsharded_copy(self.model, self.cfg, self.env.is_main)
        if self.env.is_main:
            export(model, self.tokenizer, self.output_dir / "final", self.cfg)
            atomic_write_text(self.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
        barrier()
        return results


def shard_decoder_layers(model: nn.Module, device: torch.device) -> None:
    """FSDP2 ``fully_shard`` on every decoder layer (transformers' ``*DecoderLayer``
    modules), then on the whole model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ConfigError(f"dist.strategy=fsdp: {type(model).__name__} has no *DecoderLayer "
                          f"modules to shard")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unsharded_copy(model: nn.Module, cfg: LMConfig, is_main: bool) -> nn.Module | None:
    """Under FSDP: the model's full weights gathered (every rank calls this) into a plain
    copy built on rank 0 from ``model.path`` (with the same LoRA), which ``export`` saves
    like an unsharded run's model; None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    copy, _ = load_causal_lm(cfg.model)
    if cfg.model.lora.enabled:
        copy = apply_lora(copy, cfg.model.lora)
    copy.load_state_dict(full, strict=True)
    return copy


def export(model: nn.Module, tokenizer: Any, out: pathlib.Path, cfg: LMConfig) -> None:
    """``out`` as a ``save_pretrained`` directory, replaced atomically (written beside it
    and renamed): the merged model with LoRA and ``export.merge_lora``, else the adapter."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if cfg.model.lora.enabled and cfg.export.merge_lora:
        to_save = model.merge_and_unload()  # the end of the run: the adapters merged in place
    elif cfg.model.lora.enabled:
        # the base as a path the adapter can be loaded from anywhere
        to_save.peft_config["default"].base_model_name_or_path = str(
            pathlib.Path(str(cfg.model.path)).expanduser().resolve())
    to_save.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def config_schema() -> type:
    """The config this entry point reads (``slurm.submit`` validates against it)."""
    return LMConfig


def run(cfg: LMConfig) -> dict[str, Any]:
    return LMTrainer(cfg).fit()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(argv, "Continued pretraining of a causal LM", schema=LMConfig)
    setup_logging()
    results = exit_on_run_error(lambda: run(cfg))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
