"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensors on one thread: a second OpenMP thread only adds
    synchronisation, which costs up to 100x on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Launch variables a test may set through code under test (detect_env's MASTER_ADDR
# default, the job callable's exports). Left behind, they would make every later
# subprocess (submitit's local tasks, spawned workers) wait for ranks that never come.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT")


@pytest.fixture(autouse=True)
def restore_launch_variables():
    import os

    before = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
