"""Fixtures; the shared datasets, callbacks and file makers are in ``helpers.py``."""

import os

import pytest
import torch
from helpers import TINY_OVERRIDES, tiny_data

from asg.config import load_config

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest-xdist: share the cores among the workers (and the processes that tests start)
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture
def one_thread():
    """Tiny tensors: a single intra-op thread avoids contention on shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_bundle():
    return tiny_data()


@pytest.fixture(scope="session")
def erm_run(tmp_path_factory):
    """A finished tiny ERM run (``TINY_OVERRIDES``, method erm), trained once per test process for the tests that
    start from a trained run (init_from, adaptation, evaluation). Read it; a test that changes it uses a copy
    (``helpers.copy_run``)."""
    from asg.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("erm_run") / "run"
    Trainer(load_config(None, [*TINY_OVERRIDES, "method.name=erm"]), out, data=tiny_data(), quiet=True).fit()
    return out


@pytest.fixture
def tiny_config():
    def make(*overrides: str):
        return load_config(None, TINY_OVERRIDES + list(overrides))

    return make
