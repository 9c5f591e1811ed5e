"""Fixtures of the alignment tests."""

import pytest

from lightning_plugins.modules.align.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in character-level tokenizer."""
    return load_tokenizer("char")
