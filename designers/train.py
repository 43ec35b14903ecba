"""V-pretraining entry point: ``python -m designers.train --config FILE key=value ...``.

Builds the learner's :class:`~dinov.train.trainer.Trainer` with one
:class:`~designers.meta.DesignerHook` (``designer.kind=none`` is the baseline through
the same path), runs it and prints the results (also written to ``results.json``, with
the calibration r and the last V merged in from the hook).
"""

from __future__ import annotations

import json
from typing import Any

from designers.config import V_CHOICES, VConfig
from designers.meta import DesignerHook
from dinov.cli import exit_on_run_error, parse_config, setup_logging
from dinov.train.trainer import Trainer


def run(cfg: VConfig) -> dict[str, Any]:
    """Train one V-pretraining run; returns the trainer's results."""
    hook = DesignerHook(cfg)
    return Trainer(cfg, hooks=[hook]).fit()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(argv, "V-pretraining: a learner with a task designer", schema=VConfig,
                       choices=V_CHOICES)
    setup_logging()
    results = exit_on_run_error(lambda: run(cfg))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
