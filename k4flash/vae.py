"""CogVideoX 3D causal VAE: loading and decoding latents to uint8 frames (docs/model.md "VAE decode")."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers takes seconds to import: only a process that loads a VAE pays for it
    from diffusers import AutoencoderKLCogVideoX


def load_vae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLCogVideoX:
    """Load a diffusers AutoencoderKLCogVideoX folder in eval mode on `device` in `dtype`."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} must be a torch.dtype such as torch.float32 or torch.bfloat16")
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning.
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(str(path), torch_dtype=dtype, low_cpu_mem_usage=has_accelerate)
    return vae.to(device).eval().requires_grad_(False)


def _to_vae_layout(latents: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """(F, h, w, C) or (B, F, h, w, C) channel-last latents → (B, C, F, h, w)."""
    if latents.ndim == 4:
        latents = latents.unsqueeze(0)  # (1, F, h, w, C)
    if latents.ndim != 5 or latents.shape[-1] != latent_channels:
        raise ValueError(
            f"latents shape {tuple(latents.shape)} must be (F, h, w, {latent_channels}) or (B, F, h, w, {latent_channels})"
        )
    return latents.permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)


def scaled_latents(vae: AutoencoderKLCogVideoX, latents: torch.Tensor) -> torch.Tensor:
    """Channel-last latents (F, h, w, 16) or (B, F, h, w, 16) → the decoder's input (B, 16, F, h, w), contiguous."""
    z = _to_vae_layout(latents, vae.config.latent_channels)
    # Multiply by the reciprocal (as the official code does: x / 0.7 and x * (1 / 0.7) differ by an
    # ulp in ~9% of elements) and make the tensor contiguous: the VAE's result depends slightly on the
    # input's strides, and the official layout behaves like a contiguous tensor. Both keep frames
    # bit-identical to the official pipeline.
    return ((1 / vae.config.scaling_factor) * z.to(device=vae.device, dtype=vae.dtype)).contiguous()


def decode_scaled(vae: AutoencoderKLCogVideoX, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 16, F, h, w) → video (B, 3, T, 8h, 8w) in about [-1, 1], in the official frame chunks."""
    # The official code decodes 2 latent frames per chunk (1 for a still image); the causal
    # conv cache carries across chunks, so the chunk size changes the result and must match.
    previous_batch_size = vae.num_latent_frames_batch_size
    vae.num_latent_frames_batch_size = 1 if z.shape[2] == 1 else 2
    try:
        return vae.decode(z).sample  # (B, 3, T, H, W)
    finally:
        vae.num_latent_frames_batch_size = previous_batch_size


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Video (B, 3, T, H, W) in about [-1, 1] → uint8 frames (B, T, H, W, 3) on the video's device."""
    video = ((video.float() + 1) / 2).clamp(0, 1)
    # Truncation, not rounding: the official code converts with (x * 255).to(uint8)
    # (torchvision write_video / ToPILImage .byte()), and matching it keeps frames bit-identical.
    frames = (video * 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLCogVideoX, latents: torch.Tensor) -> torch.Tensor:
    """Decode channel-last latents (F, h, w, 16) or (B, F, h, w, 16) → uint8 frames (B, T, 8h, 8w, 3) on CPU.

    T = 4(F-1)+1 for the odd F the sampler produces (1 frame for F = 1).
    """
    return to_uint8_frames(decode_scaled(vae, scaled_latents(vae, latents))).cpu()
