"""The one parity check the tests share, and its use in negative controls.

A parity test passes whatever the code does when the reference is near zero or constant (a zero-initialised
output layer, an all-black frame): `assert_parity` refuses such a reference, and a tolerance that is not small
beside the reference's magnitude. A negative control calls `assert_parity_fails` on the output of a deliberately
broken run, so the same comparison is shown to react.
"""
import os
from pathlib import Path

import torch

# The tolerance must be at most this fraction of the reference's largest magnitude.
MAX_TOLERANCE_FRACTION = 0.01
BREAKS = Path(__file__).resolve().parent / "breaks"  # its sitecustomize.py breaks parallel/ in launched ranks


def break_env(name: str) -> dict:
    """Environment entries that make every rank of a launched run break `name` (tests/breaks/sitecustomize.py)."""
    return dict(K4FLASH_TEST_BREAK=name, PYTHONPATH=os.pathsep.join([str(BREAKS), str(BREAKS.parents[1])]))


def assert_parity(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float = 0.0, what: str = "output"):
    """got equals want within atol + rtol·|want|, and want is large and varied enough for that to mean something."""
    reference = want.detach().double()
    scale = reference.abs().max().item() if reference.numel() else 0.0
    spread = reference.std().item() if reference.numel() > 1 else 0.0
    assert scale > 0 and spread > 0, f"{what}: the reference is trivially small (max |x| = {scale:.3g}, " \
                                     f"std = {spread:.3g}): a parity check on it cannot fail"
    assert max(atol, rtol * scale) <= MAX_TOLERANCE_FRACTION * scale, \
        f"{what}: tolerance atol={atol:g} rtol={rtol:g} is not small beside the reference's max |x| = {scale:.3g}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.detach().double(), reference, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def parity_holds(got: torch.Tensor, want: torch.Tensor, **tolerances) -> bool:
    """Whether assert_parity passes; the reference must pass its own check first, so False is got's fault."""
    assert_parity(want, want, **tolerances)
    try:
        assert_parity(got, want, **tolerances)
    except AssertionError:
        return False
    return True


def assert_parity_fails(got: torch.Tensor, want: torch.Tensor, **tolerances):
    """The negative control: the same check, on a broken run's output, must fail."""
    assert not parity_holds(got, want, **tolerances), "the broken run passes the parity check: it cannot fail"
