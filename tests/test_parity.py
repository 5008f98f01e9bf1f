"""The shared parity check refuses checks that cannot fail, and its negative-control form reacts."""
import pytest
import torch

from parity import assert_parity, assert_parity_fails


def test_a_trivially_small_or_constant_reference_is_refused():
    with pytest.raises(AssertionError, match="trivially small"):
        assert_parity(torch.zeros(4), torch.zeros(4), atol=1e-5)
    with pytest.raises(AssertionError, match="trivially small"):
        assert_parity(torch.full((4,), 3.0), torch.full((4,), 3.0), atol=0)


def test_a_tolerance_as_large_as_the_output_is_refused():
    want = torch.linspace(-1e-4, 1e-4, 8)
    with pytest.raises(AssertionError, match="not small beside"):
        assert_parity(want * 0, want, atol=1e-5)


def test_values_outside_the_tolerance_fail_and_inside_pass():
    want = torch.linspace(-1, 1, 8)
    assert_parity(want + 0.9e-5, want, atol=1e-5)
    with pytest.raises(AssertionError, match="latents"):
        assert_parity(want + 2e-5, want, atol=1e-5, what="latents")
    with pytest.raises(AssertionError, match="shape"):
        assert_parity(want[:4], want, atol=1e-5)


def test_the_negative_control_fails_when_the_broken_run_matches():
    want = torch.linspace(-1, 1, 8)
    assert_parity_fails(want + 1e-2, want, atol=1e-5)
    with pytest.raises(AssertionError, match="cannot fail"):
        assert_parity_fails(want, want, atol=1e-5)
