"""LM learner step time: the tiny default model and a Qwen2.5-0.5B-shaped model (its
published config, random weights), fp32 and bf16 autocast, on this machine.

Prints one JSON line: per setting the median seconds of an optimizer step and the packed
tokens per second, after one untimed step, and per model the bf16 / fp32 step-time ratio
(both measured in this run). The 0.5B model runs full-parameter AdamW on
``--micro`` sequences of ``--seq-len`` tokens (the tiny tokenizer: its vocabulary fits
the 151,936 embedding rows).

Usage: ``python benchmarks/lm_step.py [--steps N] [--seq-len L] [--micro B] [--skip-05b]``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch

import dinov  # noqa: F401  (torchvision shim first)
from designers.lm.config import LMConfig
from designers.lm.synthetic import write_default
from designers.lm.train import LMTrainer
from dinov.config import load_config

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
                  rms_norm_eps=1e-6)


def qwen25_05b_dir(root: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    out = root / "qwen2.5-0.5b-shaped"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def time_steps(model_dir: pathlib.Path, corpus: pathlib.Path, out: pathlib.Path,
               precision: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = load_config(None, [f"output_dir={out}", f"model.path={model_dir}",
                             f"data.path={corpus}", f"data.seq_len={args.seq_len}",
                             "data.shuffle_buffer=64", f"train.micro_batch_size={args.micro}",
                             "train.grad_accum=1", f"train.precision={precision}",
                             "train.progress=none"], schema=LMConfig)
    trainer = LMTrainer(cfg)
    trainer.train_step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"step_s": round(step, 3), "tokens_per_s": round(args.micro * args.seq_len / step, 1),
            "params_m": round(params / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--skip-05b", action="store_true")
    args = parser.parse_args()
    line: dict[str, object] = {"benchmark": "lm_step", "threads": torch.get_num_threads(),
                               "seq_len": args.seq_len, "micro_batch": args.micro}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        paths = write_default(root / "tiny")
        models = {"tiny": paths["model"]}
        if not args.skip_05b:
            models["qwen2.5_0.5b_shaped"] = qwen25_05b_dir(root, paths["model"])
        for name, model_dir in models.items():
            for precision in ("fp32", "bf16"):
                line[f"{name}_{precision}"] = time_steps(model_dir, paths["corpus"],
                                                         root / f"{name}_{precision}", precision, args)
            line[f"{name}_bf16_over_fp32"] = round(
                line[f"{name}_bf16"]["step_s"] / line[f"{name}_fp32"]["step_s"], 3)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
