"""Fixtures of the detection tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every detection test runs with one torch thread (see ``one_torch_thread`` in tests/conftest.py)."""
    yield
