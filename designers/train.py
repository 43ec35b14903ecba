"""V-pretraining entry point: ``python -m designers.train --config FILE key=value ...``.

Builds the learner's :class:`~dinov.train.trainer.Trainer` with one
:class:`~designers.vision.hook.VisionDesignerHook` (``designer.kind=none`` is the
baseline through the same path), runs it and prints the results (also written to
``results.json``, with the calibration r and the last V from the hook's summary).
"""

from __future__ import annotations

import json
from typing import Any

from designers.vision.config import VConfig, vconfig_schema
from designers.vision.hook import VisionDesignerHook
from dinov.cli import exit_on_run_error, parse_config, setup_logging
from dinov.train.trainer import Trainer


def config_schema() -> type:
    """The config this entry point reads (``slurm.submit`` validates against it)."""
    return vconfig_schema()


def run(cfg: VConfig) -> dict[str, Any]:
    """Train one V-pretraining run; returns the trainer's results."""
    return Trainer(cfg, hooks=[VisionDesignerHook(cfg)]).fit()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(argv, "V-pretraining: a learner with a task designer",
                       schema=config_schema())
    setup_logging()
    results = exit_on_run_error(lambda: run(cfg))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
