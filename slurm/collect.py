"""``python -m slurm.collect DIR [--metrics a,b]``: the ``results.json`` of a sweep's runs
in one table, one row per grid point, each metric as mean ± std over the seeds (sample
standard deviation; blank for a single seed), written as ``DIR/summary.md`` and
``DIR/summary.csv`` and printed.

The rows and their grid values come from ``DIR/sweep.json`` (written by
:mod:`slurm.sweep`); without it, every ``results.json`` below ``DIR`` is a run and its
group is its directory (the parent of ``seed_<s>``). Runs without results yet are counted
(``done`` column), not guessed. The default metrics are the numbers every finished run
reports.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import statistics
import sys
from typing import Any

from dinov.checkpoint import atomic_write_text

MANIFEST = "sweep.json"


def _runs(root: pathlib.Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(grid keys, runs as {group, values, output_dir}) of the sweep in ``root``."""
    manifest = root / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        return list(data["grid"]), data["runs"]
    runs = []
    for results in sorted(root.rglob("results.json")):
        run_dir = results.parent
        group_dir = run_dir.parent if run_dir.name.startswith("seed_") else run_dir
        group = str(group_dir.relative_to(root)) if group_dir != root else root.name
        runs.append({"group": group, "values": {}, "output_dir": str(run_dir)})
    return [], runs


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _results(run: dict[str, Any], root: pathlib.Path) -> dict[str, float] | None:
    # the run's place below root (the sweep may have been moved), else where it was written
    path = pathlib.Path(run["output_dir"])
    below = root / run["group"] / (f"seed_{run['seed']}" if run.get("seed") is not None else "")
    file = (below if below.is_dir() else path) / "results.json"
    if not file.is_file():
        return None
    try:
        return _numbers(json.loads(file.read_text()))
    except json.JSONDecodeError:
        print(f"warning: {file} is not JSON: counted as not done", file=sys.stderr)
        return None


def collect(root: pathlib.Path, metrics: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): per group the grid values, ``n`` (finished runs), ``done``
    (``n/total``) and per metric ``<m>_mean`` / ``<m>_std``."""
    keys, runs = _runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no {MANIFEST} and no results.json below it")
    groups: dict[str, list[tuple[dict[str, Any], dict[str, float] | None]]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append((run["values"], _results(run, root)))
    finished = [r for members in groups.values() for _, r in members if r is not None]
    if metrics is None:
        common = set.intersection(*(set(r) for r in finished)) if finished else set()
        metrics = [m for m in (finished[0] if finished else {}) if m in common]
    columns = ["group", *keys, "n", "done"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_std"]
    rows = []
    for group, members in groups.items():
        done = [r for _, r in members if r is not None]
        row: dict[str, Any] = {"group": group, **members[0][0], "n": len(done),
                               "done": f"{len(done)}/{len(members)}"}
        for metric in metrics:
            values = [r[metric] for r in done if metric in r]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return columns, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """One column per metric, ``mean ± std``."""
    metrics = [c[:-5] for c in columns if c.endswith("_mean")]
    head = [c for c in columns if not c.endswith(("_mean", "_std"))] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in head[: len(head) - len(metrics)]]
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append(_cell(mean) + (f" ± {std:.2g}" if std is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=pathlib.Path, help="the sweep's output_root")
    parser.add_argument("--metrics", default=None, help="comma-separated results.json keys")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    try:
        columns, rows = collect(args.root, metrics)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    table = markdown(columns, rows)
    atomic_write_text(args.root / "summary.md", table)
    atomic_write_text(args.root / "summary.csv", to_csv(columns, rows))
    print(table, end="")
    return rows


if __name__ == "__main__":
    main()
