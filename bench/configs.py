"""The models the benchmarks run and the inputs they feed them: one place, so every benchmark means the same
thing by "mid" or "tiny" and draws the same numbers from the same seed.

Each benchmark offers the subset of configs its hardware can run (`--config` choices); the
published DiT only where a GPU is expected (bench.gpu_dit, bench.gpu_check).
"""
import contextlib

import torch

from k4flash.published import PUBLISHED_DIT_PARAMS, TEXT_TOKENS
from k4flash.tiny import TINY_DIT_PARAMS, TINY_VAE_CONFIG
from parallel.cost import PUBLISHED_LATENT

# latent: (frames, height, width) of the DiT's input; its channels are params["in_visual_dim"] (16 in all).
DIT_CONFIGS = {
    # 5.5 B parameters; 25 x 48 x 84 → 25,200 visual + 224 text tokens (12 s at 672x384).
    "published": dict(params=PUBLISHED_DIT_PARAMS, latent=PUBLISHED_LATENT, text_tokens=TEXT_TOKENS),
    # 8 heads of 64; 5 x 16 x 24 = 1920 visual tokens + 64 text tokens.
    "mid": dict(params=dict(in_visual_dim=16, in_text_dim=256, out_visual_dim=16, time_dim=512, patch_size=(1, 2, 2),
                            model_dim=512, ff_dim=2048, num_blocks=2, axes_dims=(16, 24, 24)),
                latent=(5, 32, 48), text_tokens=64),
    "tiny": dict(params=TINY_DIT_PARAMS, latent=(3, 8, 12), text_tokens=20),
    # mid's depth (2 block pairs) at half its width: 8 heads of 32; 3 x 4 x 6 = 72 visual + 32 text tokens.
    "smoke": dict(params=dict(in_visual_dim=16, in_text_dim=128, out_visual_dim=16, time_dim=256,
                              patch_size=(1, 2, 2), model_dim=256, ff_dim=1024, num_blocks=2, axes_dims=(8, 12, 12)),
                  latent=(3, 8, 12), text_tokens=32),
}
# AutoencoderKLCogVideoX keyword arguments; None: the class defaults, which are the published config.
VAE_CONFIGS = {
    "published": None,
    # 3 spatial up levels (2 temporal), 3 resnets per up block, 8 groups.
    "mid": dict(TINY_VAE_CONFIG, block_out_channels=(16, 32, 32, 64), layers_per_block=2, norm_num_groups=8),
    "tiny": TINY_VAE_CONFIG,
}
TIMESTEP = 749.0  # the second of the distilled schedule's 4 timesteps (999, 749, 499, 249): one denoising step


def dit_inputs(config, device="cpu", dtype=torch.float32, seed=1):
    """x (1, F, H, W, C), text (1, L, in_text_dim), t (1,) for a DIT_CONFIGS entry: drawn on the CPU from `seed`,
    so they are the same numbers on every device and rank, then moved to `device` in `dtype`."""
    params = config["params"]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *config["latent"], params["in_visual_dim"], generator=generator)
    text = torch.randn(1, config["text_tokens"], params["in_text_dim"], generator=generator)
    return x.to(device, dtype), text.to(device, dtype), torch.full((1,), TIMESTEP, device=device)


def autocast_for(device, dtype):
    """A factory of the context each forward runs in. As the pipeline: bf16/fp16 weights under autocast
    (LayerNorms in float32), nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
