"""Shared pytest fixtures."""

import pytest

from k4flash.tiny import ensure_tiny_weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A freshly built tiny-weights folder (SPEC "Weights layout"), shared by the whole session."""
    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))
