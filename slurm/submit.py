"""``python -m slurm.submit --config C [key=value ...] --nodes N --gpus-per-node G
--partition P --timeout MIN [...] [--entry E] [--dry-run]``: one training run as a SLURM job
(one task per GPU) through submitit, requeued on preemption (:mod:`slurm.job`).

Everything that can be checked on the submitting host is checked before anything is
queued: the config resolves against the entry point's schema (unknown keys, wrong types,
ranges, ``???`` keys left unset), ``output_dir`` is writable, and the files the run reads
(``INPUT_PATH_KEYS`` of the schema: data, weights, feedback sets) exist where their file
system is mounted here. ``--dry-run`` prints the sbatch script submitit would submit and
the resolved config, and lists what would stop a real submission, without building an
executor. ``--cluster local`` runs the same job on this machine with submitit's
LocalExecutor (CPU processes with gloo when there is no GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import dinov  # noqa: F401  (torchvision shim before any entry point imports timm)
from dinov.config import ConfigError, load_config_with_unset, to_yaml
from slurm.job import ENTRIES, TrainingJob, entry_module

log = logging.getLogger("slurm.submit")

SUBMITIT_COMMAND = "{python} -u -m submitit.core._submit {folder}"


@dataclasses.dataclass
class ResolvedRun:
    """A run ready to submit: its entry point, config (resolved) and what is wrong with it."""

    entry: str
    config_path: str | None
    overrides: list[str]
    cfg: Any
    problems: list[str]  # each one line; a real submission refuses when any is left
    warnings: list[str]


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The SLURM resources and the local option, shared by submit and sweep."""
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout", type=int, default=60, help="minutes (sbatch --time)")
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--exclude", default=None)
    parser.add_argument("--comment", default=None)
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem-gb", type=int, default=None)
    parser.add_argument("--signal-delay", type=int, default=120,
                        help="seconds between the USR2 signal and the time limit (sbatch --signal)")
    parser.add_argument("--max-requeues", type=int, default=20,
                        help="how many time-outs submitit requeues before it gives up")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="local: submitit's LocalExecutor on this machine (one node)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and the resolved config; submit nothing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config of the run")
    parser.add_argument("--entry", default="auto",
                        help=f"auto (from the config's sections), one of {', '.join(ENTRIES)}, "
                             f"or a module with main(argv) and config_schema()")
    add_job_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    return parser.parse_args(argv)


# ----- the run config ---------------------------------------------------------------------
def _load(entry: str, config: str | None, overrides: list[str]) -> tuple[Any, list[str]]:
    schema = entry_module(entry).config_schema()
    return load_config_with_unset(config, [*overrides, "train.resume=true"], schema)


def choose_entry(entry: str, config: str | None, overrides: list[str]) -> tuple[str, Any, list[str]]:
    """``entry`` and the config loaded with its schema; with ``auto``, the first built-in
    entry point whose schema accepts the config (plain DINO before V-pretraining, whose
    schema extends it, then the LM)."""
    if entry != "auto":
        return (entry, *_load(entry, config, overrides))
    errors = []
    for candidate in ENTRIES:
        try:
            return (candidate, *_load(candidate, config, overrides))
        except ConfigError as error:
            errors.append(f"as {candidate}: {error}")
    raise ConfigError(f"{config}: no entry point accepts this config ({'; '.join(errors)}); "
                      f"fix the key or pass --entry")


def _select(cfg: Any, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def _mounted_here(path: pathlib.Path) -> bool:
    """True when the file system ``path`` would live on is visible here: its nearest
    existing ancestor is not the root (``/scratch/...`` on a login node without /scratch
    cannot be checked)."""
    absolute = path.expanduser().absolute()
    for parent in absolute.parents:
        if parent.exists():
            return parent != pathlib.Path(absolute.anchor)
    return False


def check_paths(cfg: Any, dry_run: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings) of ``output_dir`` and the input paths of the config's schema."""
    problems: list[str] = []
    warnings: list[str] = []
    for key in getattr(type(cfg), "INPUT_PATH_KEYS", ()):
        value = _select(cfg, key)
        if not value:
            continue
        path = pathlib.Path(str(value)).expanduser()
        if path.exists():
            continue
        if _mounted_here(path):
            problems.append(f"{key}={value}: no such file or directory")
        else:
            warnings.append(f"{key}={value}: not visible from this host, not checked")
    out = pathlib.Path(str(cfg.output_dir)).expanduser()
    problem = _writable(out, create=not dry_run)
    if problem:
        problems.append(f"output_dir={cfg.output_dir}: {problem}")
    return problems, warnings


def _writable(directory: pathlib.Path, create: bool) -> str | None:
    """Why ``directory`` cannot take the run's files, or None. A dry run creates nothing."""
    if not create:
        existing = next((p for p in [directory, *directory.absolute().parents] if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK):
            return f"not writable ({existing} is not)"
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        return f"not writable ({error.strerror or error})"
    return None


def resolve_run(entry: str, config: str | None, overrides: list[str], dry_run: bool) -> ResolvedRun:
    """The run config as the job will load it, and everything wrong with it."""
    entry, cfg, unset = choose_entry(entry, config, overrides)
    problems = [f"required key {key} is not set" for key in unset]
    path_problems, warnings = check_paths(cfg, dry_run)
    config_path = str(pathlib.Path(config).absolute()) if config else None
    return ResolvedRun(entry, config_path, list(overrides), cfg, problems + path_problems, warnings)


# ----- the job --------------------------------------------------------------------------
def slurm_parameters(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """sbatch settings in submitit's ``SlurmExecutor`` names (one task per GPU)."""
    params: dict[str, Any] = {
        "job_name": name, "time": args.timeout, "nodes": args.nodes,
        "ntasks_per_node": args.gpus_per_node, "gpus_per_node": args.gpus_per_node,
        "signal_delay_s": args.signal_delay,
    }
    optional = {"partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint, "exclude": args.exclude, "comment": args.comment,
                "cpus_per_task": args.cpus_per_task,
                "mem": f"{args.mem_gb}GB" if args.mem_gb else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def job_folder(cfg: Any) -> pathlib.Path:
    """Where submitit keeps the job's pickles and logs: ``output_dir/slurm/<job id>``."""
    return pathlib.Path(str(cfg.output_dir)).expanduser().absolute() / "slurm" / "%j"


def sbatch_script(args: argparse.Namespace, run: ResolvedRun, name: str) -> str:
    """The sbatch file submitit writes for this job (its own template, not built here)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor submits

    folder = job_folder(run.cfg)
    command = SUBMITIT_COMMAND.format(python=sys.executable, folder=folder)
    return _make_sbatch_string(command=command, folder=str(folder), **slurm_parameters(args, name))


def build_executor(args: argparse.Namespace, folder: pathlib.Path, name: str) -> Any:
    """submitit's SlurmExecutor (or LocalExecutor with ``--cluster local``), configured."""
    import submitit

    if args.cluster == "local":
        if args.nodes != 1:
            raise ConfigError(f"--cluster local runs on one node, got --nodes {args.nodes}")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        # without gpus_per_node submitit hides every GPU from the tasks (CUDA_VISIBLE_DEVICES="")
        gpus = args.gpus_per_node if _has_cuda() else 0
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=args.gpus_per_node,
                                   gpus_per_node=gpus, signal_delay_s=args.signal_delay)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args, name))
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def job_name(args: argparse.Namespace, run: ResolvedRun) -> str:
    return args.job_name or f"{run.entry}:{pathlib.Path(str(run.cfg.output_dir)).name}"


def report(run: ResolvedRun, dry_run: bool) -> None:
    for warning in run.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in run.problems:
        print(f"{'not ready' if dry_run else 'error'}: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> Any:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        run = resolve_run(args.entry, args.config, args.overrides, args.dry_run)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    name = job_name(args, run)
    report(run, args.dry_run)
    if args.dry_run:
        print(f"# entry: python -m {run.entry} (resumes from output_dir on every start)")
        print(sbatch_script(args, run, name))
        print("# resolved run config")
        print(to_yaml(run.cfg))
        if run.problems:
            print(f"# a real submission would refuse: {len(run.problems)} problem(s) above",
                  file=sys.stderr)
        return None
    if run.problems:
        raise SystemExit(2)
    executor = build_executor(args, job_folder(run.cfg), name)
    job = executor.submit(TrainingJob(run.entry, run.config_path, run.overrides))
    print(f"submitted job {job.job_id} ({run.entry}, {args.nodes}x{args.gpus_per_node} tasks): "
          f"logs in {str(job_folder(run.cfg)).replace('%j', str(job.job_id))}")
    if args.cluster == "local":  # the jobs are this process's children: wait, as a local run does
        while not job.done():
            time.sleep(1.0)
        return job.results()
    return job


if __name__ == "__main__":
    main()
