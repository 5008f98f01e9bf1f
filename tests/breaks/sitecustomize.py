"""Test-only: break one piece of the product in every process of a launched run (torchrun, torchrun.sh), so a test
that compares a subprocess run's outputs can show its comparison fails when the feature is broken.

Used by putting this folder first on PYTHONPATH with K4FLASH_TEST_BREAK set to one of BREAKS; Python imports
`sitecustomize` at start-up, and this one patches the named module right after it is first imported. Without
K4FLASH_TEST_BREAK it does nothing.
"""
import importlib.abc
import importlib.machinery
import os
import sys


def _drop_all_reduce(comm):
    """The row-parallel all-reduce returns this rank's partial sum (still called, never summed)."""
    original = comm.all_reduce_sum

    def partial_only(tensor, group):
        original(tensor.clone(), group)  # every rank still meets the collective, so nothing hangs
        return tensor
    comm.all_reduce_sum = partial_only


def _shift_slice(load):
    """Each rank loads its neighbour's rows of every column-parallel weight (same shapes, wrong heads)."""
    from parallel.tp import ROWWISE  # imported by parallel.load already
    original = load.take_shard

    # Shifting the row-parallel columns too would only relabel the ranks (the same sum): shift one side only.
    def neighbours(read, style, kind, shape, rank, world):
        shifted = rank if style == ROWWISE else (rank + 1) % world
        return original(read, style, kind, shape, shifted, world)
    load.take_shard = neighbours


def _decode_raises(vae):
    """The VAE decode raises as a CUDA out-of-memory error does (an ordinary exception)."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
    vae.decode_latents = out_of_memory


def _decode_aborts(vae):
    """The VAE decode ends its process in native code, as a sticky CUDA error or a segfault does: no `except` runs."""
    def abort(*args, **kwargs):
        os.abort()
    vae.decode_latents = abort


BREAKS = {"all_reduce": ("parallel.comm", _drop_all_reduce), "shifted_slice": ("parallel.load", _shift_slice),
          "decode_raises": ("k4flash.vae", _decode_raises), "decode_aborts": ("k4flash.vae", _decode_aborts)}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, module_name, patch):
        self.module_name, self.patch = module_name, patch

    def find_spec(self, name, path, target=None):
        if name != self.module_name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            load(module)
            patch(module)
            print(f"[tests/breaks] {self.module_name} broken: {patch.__doc__}", file=sys.stderr)
        spec.loader.exec_module = exec_then_patch
        return spec


_name = os.environ.get("K4FLASH_TEST_BREAK")
if _name:
    if _name not in BREAKS:
        raise SystemExit(f"K4FLASH_TEST_BREAK={_name!r}: allowed {sorted(BREAKS)}")
    sys.meta_path.insert(0, _PatchAfterImport(*BREAKS[_name]))
