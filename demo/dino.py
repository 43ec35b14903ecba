"""``python -m demo.dino --config configs/demo.yaml``: pretrain a small ViT with DINO/iBOT on
synthetic scenes, then compare the online linear probe of the trained backbone with the same
backbone at initialisation.

Prints a results table and leaves ``runs/demo/`` with ``results.json``, ``metrics.jsonl``,
``config.yaml``, checkpoints and the loss/probe plots.
"""

from __future__ import annotations

import json
import pathlib
import time

from dinov.cli import parse_config, setup_logging
from dinov.train.trainer import Trainer


def format_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    lines = [f"| {header[0]:<{width}} | {header[1]} |", f"|{'-' * (width + 2)}|{'-' * (len(header[1]) + 2)}|"]
    lines += [f"| {name:<{width}} | {value:>{len(header[1])}} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, "DINO/iBOT demo on synthetic scenes")
    setup_logging()
    started = time.perf_counter()
    results = Trainer(cfg).fit()
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = pathlib.Path(cfg.output_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("backbone at initialisation", f"{results['probe_top1_init']:.1f}"),
        (f"after {results['steps']} DINO/iBOT steps", f"{results['probe_top1_final']:.1f}"),
    ]
    print()
    print(format_table(rows, ("online linear probe (8 classes)", "top-1 %")))
    print(f"\nloss {results['first_logged_loss']:.3f} -> {results['final_loss']:.3f}; "
          f"{results['wall_seconds']} s; outputs in {out}/ (results.json, loss.png, probe.png)")
    return results


if __name__ == "__main__":
    main()
