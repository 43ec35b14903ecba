"""``python -m dinov.train --config FILE key=value ...``: plain DINO/iBOT pretraining."""

from __future__ import annotations

import json
from typing import Any

from dinov.cli import exit_on_run_error, parse_config, setup_logging
from dinov.config import Config
from dinov.train.trainer import Trainer


def config_schema() -> type:
    """The config this entry point reads (``slurm.submit`` validates against it)."""
    return Config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(argv, "DINO/iBOT student-teacher pretraining")
    setup_logging()
    results = exit_on_run_error(lambda: Trainer(cfg).fit())
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
