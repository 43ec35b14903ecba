"""Shared command-line handling: ``--config FILE key=value ...`` -> typed config, clear errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from dinov.config import Config, ConfigError, load_config

ConfigT = TypeVar("ConfigT")
T = TypeVar("T")


def parse_config(argv: list[str] | None, description: str,
                 schema: type[ConfigT] = Config) -> ConfigT:  # type: ignore[assignment]
    """Parse ``--config FILE`` plus ``key=value`` overrides; exit 2 with one message on error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config file (schema defaults otherwise)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides, schema=schema)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_on_run_error(run: Callable[[], T]) -> T:
    """``run()``; a refused resume or a config error found at start-up (exit 2), a run
    stopped by non-finite steps or a missing file (exit 1) ends in one ``error:`` line."""
    from dinov.runs import RunError

    try:
        return run()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as error:  # a refused resume (2), a run stopped by divergence (1)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except FileNotFoundError as error:  # a missing data, weights or model file: named
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
