"""The distilled 4-step "renoise" sampler (docs/model.md "Sampler"), as a few pure functions.

Seed fidelity with the official code rests on three details reproduced here:
- every draw comes from one CPU generator, in the order initial latent, then one
  re-noise draw per step, whatever the device or number of ranks;
- the draws are rounded to bf16 (the official code casts them), then promoted;
- the latent is carried in float64 between steps (the official update multiplies by
  the scheduler's float64 ᾱ, which promotes), and cast to the DiT's dtype for the call.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .published import NUM_STEPS

# CogVideoX-5b's scheduler_config.json (docs/model.md "Sampler"), used when no scheduler folder is given.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple  # ints, e.g. (999, 749, 499, 249)
    alphas_cumprod: tuple  # ᾱ at those timesteps, float64 values


def load_schedule(scheduler_path=None, num_steps: int = NUM_STEPS) -> Schedule:
    """Timesteps and ᾱ from a diffusers scheduler folder (or CogVideoX-5b's config above)."""
    from diffusers import CogVideoXDDIMScheduler

    config = dict(DEFAULT_SCHEDULER_CONFIG)
    if scheduler_path is not None:
        config_file = Path(scheduler_path)
        if config_file.is_dir():
            config_file = config_file / "scheduler_config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read scheduler config {config_file}: {err}") from err
    if config.get("prediction_type", "v_prediction") != "v_prediction":
        raise ValueError(f"scheduler prediction_type={config['prediction_type']!r}; the sampler needs 'v_prediction'")
    scheduler = CogVideoXDDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    timesteps = tuple(int(t) for t in scheduler.timesteps)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    return Schedule(timesteps, tuple(float(alphas[t]) for t in timesteps))


def latent_dtype_for(device) -> torch.dtype:
    # MPS has no float64; elsewhere follow the official float64 trajectory.
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def renoise(latent, noise, alpha_cumprod: float):
    """Re-noise the current clean estimate to the level ᾱ (the DDPM forward process)."""
    return alpha_cumprod ** 0.5 * latent + (1.0 - alpha_cumprod) ** 0.5 * noise


def x0_from_velocity(latent, velocity, alpha_cumprod: float):
    """Clean estimate from a v-prediction at level ᾱ."""
    return alpha_cumprod ** 0.5 * latent - (1.0 - alpha_cumprod) ** 0.5 * velocity


class NonFiniteLatentsError(FloatingPointError):
    """The DiT produced NaN or infinity: the video would be garbage, so nothing is decoded or written."""


def check_finite_steps(step_is_finite: list, schedule: Schedule) -> None:
    """Raise NonFiniteLatentsError naming the first step whose latents were not all finite.

    `step_is_finite` holds one boolean tensor per step, still on the device: this is the
    only host sync of the check, once per video rather than once per step or block.
    """
    if not step_is_finite:
        return
    flags = torch.stack(step_is_finite).cpu()
    if bool(flags.all()):
        return
    step = int((~flags).nonzero()[0])
    raise NonFiniteLatentsError(
        f"latents are not finite after denoising step {step + 1} of {len(schedule.timesteps)} "
        f"(timestep {schedule.timesteps[step]}): the DiT produced NaN/inf (check the weights and dtype)")


def draw_noise(shape, num_steps: int, seed: int, device="cpu", noise_dtype=torch.bfloat16) -> torch.Tensor:
    """Every draw of one video, up front: (1 + num_steps, *shape) in noise_dtype on `device`.

    One CPU generator, one randn call per draw in the official order (the initial latent, then one
    re-noise draw per step), each rounded to noise_dtype; then a single copy to the device, from
    pinned memory on CUDA, so that the step loop itself never waits on the host.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = torch.stack([torch.randn(shape, generator=generator).to(noise_dtype) for _ in range(1 + num_steps)])
    device = torch.device(device)
    if device.type == "cuda":
        return draws.pin_memory().to(device, non_blocking=True)
    return draws.to(device)


def sample(velocity_fn, shape, schedule: Schedule, seed: int, device="cpu", noise_dtype=torch.bfloat16,
           on_step=None, check_finite=True) -> torch.Tensor:
    """Run the renoise sampler; returns the final latents (shape, float32, on `device`).

    velocity_fn(latent (shape, float64), timestep: int) → velocity (shape), any float dtype.
    on_step(i, timestep, latent) is called after each step (progress, checks).
    check_finite: raise NonFiniteLatentsError, naming the step, if any step's latents hold NaN/inf.
    """
    state_dtype = latent_dtype_for(device)
    noise = draw_noise(shape, len(schedule.timesteps), seed, device, noise_dtype).to(state_dtype)
    latent = noise[0]
    step_is_finite = []
    for i, (timestep, alpha) in enumerate(zip(schedule.timesteps, schedule.alphas_cumprod)):
        latent = renoise(latent, noise[i + 1], alpha)
        velocity = velocity_fn(latent, timestep).to(state_dtype)
        latent = x0_from_velocity(latent, velocity, alpha)
        if check_finite:
            step_is_finite.append(torch.isfinite(latent).all())  # stays on the device: no sync here
        if on_step is not None:
            on_step(i, timestep, latent)
    check_finite_steps(step_is_finite, schedule)
    return latent.float()
