"""Shared pytest fixtures."""

import pytest
import torch

from k4flash.tiny import ensure_tiny_weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A freshly built tiny-weights folder (docs/model.md "Weights layout"), shared by the whole session."""
    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="session")
def tiny_cache(tiny_weights, tmp_path_factory):
    """A $K4FLASH_CACHE in which `model=tiny` finds the session's tiny weights (for subprocess runs)."""
    cache = tmp_path_factory.mktemp("k4cache")
    (cache / "tiny-v1").symlink_to(tiny_weights, target_is_directory=True)
    return cache


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_the_suite():
    """The whole suite runs tiny models with one intra-op thread (see one_torch_thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op thread, then restore the setting.

    The tiny models are many small ops: on a small, busy machine two OpenMP threads spin
    against each other and the other processes (a tiny VAE decode: 0.09 s with one thread,
    1-2 s with two under load).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
