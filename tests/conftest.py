"""Fixtures shared by the whole suite."""

import logging
import warnings

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (then restore the count).

    On the 2 shared cores these tests run on, two contended torch threads are many times slower than one, and one
    thread keeps reduction order (hence results) fixed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quiet_lightning():
    """Silence Lightning's info logs and warnings for the session (for suites that run many tiny Trainers)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
