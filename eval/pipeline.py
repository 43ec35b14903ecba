"""What every evaluation pipeline shares, whatever it evaluates: the ``main`` that turns
errors into one line and an exit code, the output-directory check before any work,
writing the resolved config and results, and seeding. No model or data code here, so the
vision and the language-model evaluations can both use it.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from dinov.checkpoint import atomic_write_text
from dinov.cli import parse_config
from dinov.config import ConfigError, save_config


def prepare_output_dir(output_dir: str | pathlib.Path,
                       name: str = "config key 'output_dir'") -> pathlib.Path:
    """Create ``output_dir`` and prove it writable, before any feature is extracted.

    Every eval CLI calls this first: otherwise an unwritable directory is found only when
    the results are written, after all the work, and the results are lost. ``name`` is
    how the error calls the setting.
    """
    out = pathlib.Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass  # created and removed again
    except OSError as error:
        raise ConfigError(
            f"{name}: cannot write to {out} "
            f"({error.strerror or type(error).__name__}); choose a writable directory"
        ) from None
    return out


def cli_main(argv: list[str] | None, description: str, schema: type,
             run: Callable[[Any], dict[str, Any]],
             report: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Every eval CLI's ``main``: parse ``--config FILE key=value ...`` into ``schema``,
    ``run(cfg)``, print ``report(results)``; returns the results.

    The one error path: a config error (unknown key, bad value, unwritable output_dir)
    exits 2 and a missing data or weights file exits 1, each with one ``error:`` line
    naming the key or file. Callers that want exceptions call ``run(cfg)`` directly.
    """
    cfg = parse_config(argv, description, schema=schema)
    try:
        results = run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(report(results))
    return results


def write_run(output_dir: str | pathlib.Path, cfg: Any, results: dict[str, Any]) -> pathlib.Path:
    """Write ``config.yaml`` and ``results.json`` into ``output_dir``; returns the results path."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    path = out / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
