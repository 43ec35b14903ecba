"""Cluster launch: submitit jobs that resume on every start (:mod:`slurm.job`), one run
(:mod:`slurm.submit`), grids of runs as job arrays (:mod:`slurm.sweep`) and their results
in one table (:mod:`slurm.collect`)."""
