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


# The modules with the longest runs, first: with pytest-xdist (`-n`, `--dist loadfile`) each module runs whole on
# one worker, so starting the long ones first keeps one of them from being the last thing the suite waits for.
LONGEST_FIRST = ("test_lost_node.py", "test_two_nodes.py", "test_plans.py", "test_tp.py", "test_faults.py",
                 "test_serve.py", "test_batch.py", "test_fp8.py", "test_full_disk.py",
                 "test_vae_parallel.py", "test_offline_node.py", "test_bench.py", "test_dit_offload.py",
                 "test_launch.py", "test_browser.py", "test_readme.py", "test_slurm.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order
