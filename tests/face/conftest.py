"""Face tests run torch with one thread (fixed reduction order; fast on shared 2-core machines)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
