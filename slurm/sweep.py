"""``python -m slurm.sweep GRID.yaml [--dry-run] [--cluster local] [job options]``: a grid of
overrides of one run config, one job each (a SLURM job array), in readable directories.

A grid file::

    config: configs/vsmoke.yaml        # the run config every job starts from
    entry: auto                        # as slurm.submit's --entry
    output_root: runs/sweeps/designers # jobs write to <output_root>/<group>/seed_<s>
    overrides: [train.steps=200]       # for every job
    grid:                              # the product of these lists ...
      designer.kind: [mask, augment]
      feedback.mode: [real, random]
    seeds: [0, 1, 2]                   # ... times train.seed (averaged by slurm.collect)
    job: {nodes: 1, gpus_per_node: 1, timeout: 120, partition: null}  # defaults of the options

A group's directory is named from the last part of each key and its value
(``kind-mask__mode-random``). Every job's config is resolved and checked before anything is
submitted (:func:`slurm.submit.resolve_run`), and ``<output_root>/sweep.json`` lists the
jobs for :mod:`slurm.collect`. With ``--cluster local`` the jobs run on this machine through
submitit's LocalExecutor and the command waits for them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

import dinov  # noqa: F401  (torchvision shim first)
from dinov.checkpoint import atomic_write_text
from dinov.config import ConfigError
from slurm.job import TrainingJob
from slurm.submit import add_job_arguments, build_executor, report, resolve_run

MANIFEST = "sweep.json"
_GRID_KEYS = {"config", "entry", "output_root", "overrides", "grid", "seeds", "job"}


@dataclass
class SweepRun:
    group: str  # the grid point's directory name
    seed: int | None
    values: dict[str, Any]  # grid key -> value
    overrides: list[str]  # everything the job adds to the config
    output_dir: str


@dataclass
class Sweep:
    config: str | None
    entry: str
    output_root: str
    overrides: list[str]
    grid: dict[str, list[Any]]
    seeds: list[int] | None
    job: dict[str, Any] = field(default_factory=dict)


def _value_text(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "none"


def _override_text(value: Any) -> str:
    """A grid value as a ``key=value`` override reads it back (None: null, True: true)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def group_name(values: dict[str, Any]) -> str:
    """``designer.kind=mask, feedback.mode=real`` -> ``kind-mask__mode-real`` (the whole
    key where two keys end alike)."""
    tails = [key.rsplit(".", 1)[-1] for key in values]
    names = [key if tails.count(tail) > 1 else tail for key, tail in zip(values, tails, strict=True)]
    return "__".join(f"{_value_text(n)}-{_value_text(v)}" for n, v in zip(names, values.values(), strict=True)) or "base"


def load_sweep(path: pathlib.Path) -> Sweep:
    """The grid file, checked: known keys, lists for every grid axis and the seeds."""
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with config, output_root and grid")
    unknown = sorted(set(raw) - _GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(_GRID_KEYS)}")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map each dotted key to a non-empty list of values")
    seeds = raw.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{path}: 'seeds' must be a list of integers, got {seeds!r}")
    if "output_root" not in raw:
        raise ConfigError(f"{path}: 'output_root' is required (where the jobs write)")
    config = raw.get("config")
    if config is not None and not pathlib.Path(config).is_absolute() and not pathlib.Path(config).exists():
        config = str(path.parent / config)  # relative to the grid file
    return Sweep(config=config, entry=str(raw.get("entry", "auto")), output_root=str(raw["output_root"]),
                 overrides=[str(o) for o in raw.get("overrides") or []],
                 grid={str(k): list(v) for k, v in grid.items()}, seeds=seeds, job=dict(raw.get("job") or {}))


def expand(sweep: Sweep) -> list[SweepRun]:
    """Every grid point times every seed, in grid order."""
    runs = []
    keys = list(sweep.grid)
    for point in itertools.product(*(sweep.grid[k] for k in keys)):
        values = dict(zip(keys, point, strict=True))
        group = group_name(values)
        for seed in sweep.seeds if sweep.seeds is not None else [None]:
            out = pathlib.Path(sweep.output_root) / group
            extra = [f"{k}={_override_text(v)}" for k, v in values.items()]
            if seed is not None:
                out = out / f"seed_{seed}"
                extra.append(f"train.seed={seed}")
            out = out.absolute()  # the collector may run from anywhere
            runs.append(SweepRun(group, seed, values, [*sweep.overrides, *extra, f"output_dir={out}"], str(out)))
    return runs


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sweep]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=pathlib.Path, help="the grid file (YAML)")
    add_job_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value for every job (after the grid file's)")
    for action in parser._actions:  # the grid file's job: section fills what is not given
        if action.dest not in ("help", "grid", "dry_run", "cluster", "overrides"):
            action.default = None
    args = parser.parse_args(argv)
    sweep = load_sweep(args.grid)
    sweep.overrides += args.overrides
    defaults = {"nodes": 1, "gpus_per_node": 1, "timeout": 60, "signal_delay": 120, "max_requeues": 20}
    for key, value in {**defaults, **sweep.job}.items():
        if not hasattr(args, key) or key in ("cluster", "dry_run", "grid", "overrides"):
            raise ConfigError(f"{args.grid}: job: {key!r} is not a job option (the resources: "
                              f"nodes, gpus_per_node, timeout, partition, ...; --cluster and "
                              f"--dry-run go on the command line)")
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, sweep


def main(argv: list[str] | None = None) -> list[Any]:
    try:
        args, sweep = parse_args(argv)
        runs = expand(sweep)
        resolved = [resolve_run(sweep.entry, sweep.config, run.overrides, args.dry_run) for run in runs]
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    problems = 0
    for run, checked in zip(runs, resolved, strict=True):
        if checked.problems or checked.warnings:
            print(f"# {run.output_dir}", file=sys.stderr)
            report(checked, args.dry_run)
        problems += len(checked.problems)
    print(f"# {len(runs)} job(s) of python -m {resolved[0].entry}, {len(sweep.grid)} grid key(s), "
          f"seeds {sweep.seeds}")
    for run in runs:
        print(f"{run.output_dir}  {' '.join(run.overrides)}")
    if args.dry_run:
        return []
    if problems:
        raise SystemExit(2)
    root = pathlib.Path(sweep.output_root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"config": sweep.config, "entry": resolved[0].entry, "grid": sweep.grid, "seeds": sweep.seeds,
                "runs": [vars(run) for run in runs]}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    executor = build_executor(args, root.absolute() / "slurm" / "%j", args.job_name or f"sweep:{root.name}")
    with executor.batch():  # one job array
        jobs = [executor.submit(TrainingJob(c.entry, c.config_path, c.overrides)) for c in resolved]
    print(f"submitted {len(jobs)} job(s): {', '.join(str(j.job_id) for j in jobs[:4])}"
          f"{' ...' if len(jobs) > 4 else ''}")
    if args.cluster == "local":
        wait_for(jobs)
    return jobs


def wait_for(jobs: list[Any]) -> None:
    """Block until local jobs end; raise with the first failure's traceback."""
    while not all(job.done() for job in jobs):
        time.sleep(1.0)
    for job in jobs:
        job.results()


if __name__ == "__main__":
    main()
