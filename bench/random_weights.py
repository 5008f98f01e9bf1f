"""The published-size models (DiT, VAE, T5 encoder) with random weights, materialised directly on the device
that runs them: no checkpoint, and no host copy of the weights (5.5 B parameters would be 22 GB in float32)."""
import math

import torch

from k4flash.dit import DiffusionTransformer3D


@torch.no_grad()
def build_random_dit(params, device, dtype, seed=0):
    """The DiT materialised directly on `device` in `dtype` with random weights (no host copy of the weights).

    Linear weights ~ N(0, 1/fan_in) so activations keep their scale through the blocks;
    the modulation layers 10x smaller so the gates stay small; biases 0; norms identity.
    The model is cast while still on meta, then materialised in `dtype`: the weights take their
    own size once, with no float32 model staged first (the published DiT peaked at 22 GB of float32
    plus its 11 GB bf16 copy). The values are drawn in `dtype` as before: the same weights.
    """
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    model.to(dtype).to_empty(device=device)  # meta → dtype costs nothing; then one allocation per tensor
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 2:
            std = 1 / math.sqrt(param.shape[1]) * (0.1 if "modulation" in name else 1.0)
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    model.init_derived_buffers()  # RoPE buffers: computed in float32 on the CPU, then moved
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def build_random_vae(vae_config, device, dtype, seed=0):
    """AutoencoderKLCogVideoX(**vae_config) (None: the published config) materialised on `device` in `dtype`:
    built on meta, so no host copy; convolutions ~ N(0, 1/fan_in), GroupNorm scales 1, biases 0, and the last
    convolution 0.3x so frames use the [-1, 1] range without saturating (as k4flash.tiny does)."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**(vae_config or {}))
    # nn.Module.to, not diffusers' override, which warns about fp32 modules this model does not have.
    vae = torch.nn.Module.to(vae, dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in vae.named_parameters():
        if param.ndim >= 2:  # (out, in, *kernel)
            param.normal_(0.0, 1 / math.sqrt(math.prod(param.shape[1:])), generator=generator)
        elif name.endswith("weight"):  # the only 1-D weights are GroupNorm scales
            param.fill_(1.0)
        else:
            param.zero_()
    for param in vae.decoder.conv_out.parameters():
        param.mul_(0.3)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def build_random_t5(t5_config: dict, vocab_size: int, device, dtype, seed=0):
    """A T5 encoder of `t5_config`'s shape (cost.T5_XXL on a GPU) with random weights, built in `dtype` on `device`
    (meta first: no float32 copy, no host copy when `device` is a GPU)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{"feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
                         "tie_word_embeddings": False, **t5_config, "vocab_size": vocab_size})  # T5-v1.1's kind
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "layer_norm" in name:
            param.fill_(1.0)
        else:  # embeddings and projections: unit-scale activations through the blocks
            param.normal_(0.0, 1 / math.sqrt(param.shape[-1]), generator=generator)
    return model.eval().requires_grad_(False)
