"""The 4-step renoise sampler against the loop in docs/model.md "Sampler" and the scheduler config."""
import json

import pytest
import torch

from k4flash.sampler import DEFAULT_SCHEDULER_CONFIG, NonFiniteLatentsError, load_schedule, sample


def test_schedule_is_the_distilled_one():
    schedule = load_schedule()
    assert schedule.timesteps == (999, 749, 499, 249)
    expected = (0.0, 0.0332, 0.2424, 0.6542)
    assert all(abs(a - e) < 1e-4 for a, e in zip(schedule.alphas_cumprod, expected))


def test_schedule_is_read_from_the_scheduler_folder(tmp_path):
    config = dict(DEFAULT_SCHEDULER_CONFIG, snr_shift_scale=3.0)  # CogVideoX-2b's value
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    shifted = load_schedule(tmp_path)
    assert shifted.timesteps == (999, 749, 499, 249)
    assert shifted.alphas_cumprod[1] < load_schedule().alphas_cumprod[1] - 0.01


def spec_pseudocode(velocity_fn, shape, schedule, seed):
    """The documented loop verbatim, with the official bf16 rounding of the draws."""
    g = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(shape, generator=g).to(torch.bfloat16).double()
    for t, a in zip(schedule.timesteps, schedule.alphas_cumprod):
        eps = torch.randn(shape, generator=g).to(torch.bfloat16).double()
        z = a ** 0.5 * z + (1 - a) ** 0.5 * eps
        v = velocity_fn(z, t)
        z = a ** 0.5 * z - (1 - a) ** 0.5 * v
    return z.float()


def fake_velocity(z, t):
    return torch.tanh(z.float() * (t / 1000.0)).double() + 0.1


def test_sample_matches_the_spec_loop_and_is_deterministic():
    schedule, shape = load_schedule(), (3, 4, 6, 16)
    calls = []

    def recording(z, t):
        calls.append((t, z.dtype))
        return fake_velocity(z, t)

    out = sample(recording, shape, schedule, seed=42)
    assert [t for t, _ in calls] == [999, 749, 499, 249]
    assert all(dtype == torch.float64 for _, dtype in calls)
    torch.testing.assert_close(out, spec_pseudocode(fake_velocity, shape, schedule, 42), rtol=0, atol=0)
    torch.testing.assert_close(out, sample(fake_velocity, shape, schedule, seed=42), rtol=0, atol=0)
    assert (out - sample(fake_velocity, shape, schedule, seed=43)).abs().max() > 0.1


def test_first_step_input_is_the_first_renoise_draw():
    """ᾱ(999) = 0 (zero terminal SNR): the DiT's first input is exactly the 2nd draw, bf16-rounded."""
    seen = []
    sample(lambda z, t: seen.append(z.clone()) or torch.zeros_like(z), (2, 2, 2, 16), load_schedule(), seed=7)
    g = torch.Generator("cpu").manual_seed(7)
    torch.randn((2, 2, 2, 16), generator=g)
    second = torch.randn((2, 2, 2, 16), generator=g).to(torch.bfloat16).double()
    torch.testing.assert_close(seen[0], second, rtol=0, atol=0)


def test_non_finite_latents_name_the_step():
    schedule = load_schedule()
    calls = []

    def velocity(latent, timestep):
        calls.append(timestep)
        v = torch.zeros_like(latent)
        if timestep == 499:  # the third step blows up in one element
            v[0, 1, 2, 3] = float("nan")
        return v

    with pytest.raises(NonFiniteLatentsError, match=r"step 3 of 4 \(timestep 499\)"):
        sample(velocity, (1, 4, 4, 16), schedule, seed=0)
    assert calls == [999, 749, 499, 249]  # checked once at the end, not with a sync per step

    # Infinity is caught too, and the first bad step is the one named.
    with pytest.raises(NonFiniteLatentsError, match=r"step 1 of 4 \(timestep 999\)"):
        sample(lambda z, t: torch.full_like(z, float("inf")), (1, 4, 4, 16), schedule, seed=0)
    finite = sample(lambda z, t: torch.zeros_like(z), (1, 4, 4, 16), schedule, seed=0)
    assert torch.isfinite(finite).all()
