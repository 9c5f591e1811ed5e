"""Fixtures for the FP8 precision-plugin tests: one CPU thread, quiet Lightning, registration restored."""

from __future__ import annotations

import warnings

import pytest

from lightning_plugins.precision import registration


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True, scope="session")
def _quiet(quiet_lightning):
    warnings.filterwarnings("ignore", message=".*model summary.*")


@pytest.fixture(autouse=True)
def _registered():
    """Every test starts and ends with the string flag registered, as after ``import lightning_plugins``."""
    registration.register_precision_flag()
    yield
    registration.register_precision_flag()
