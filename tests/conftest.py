"""Fixtures shared by the whole suite."""

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
