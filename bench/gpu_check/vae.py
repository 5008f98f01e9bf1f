"""Section 4: the VAE decode of the run's latents as the pipeline decodes them (2 latent frames per chunk,
uint8 frames on the host)."""
import statistics
import time

import torch

from bench.random_weights import build_random_vae
from bench.timing import Timer, time_calls


def time_vae_decode(config, device, dtype, warmup, repeats):
    """Section 4: the pipeline's decode stage (decode_latents) on random latents (F, h, w, 16)."""
    from k4flash.vae import decode_latents

    clock = time.perf_counter()
    vae = build_random_vae(config["vae"], device, dtype)
    build_s = time.perf_counter() - clock
    latent = config["vae_latent"]
    latents = torch.randn(*latent, vae.config.latent_channels, generator=torch.Generator().manual_seed(2)).to(device)
    timer = Timer(device)
    finite = []
    # Finiteness from the decoder's own output (the frames are uint8 by then); the flags stay on the device.
    hook = vae.decoder.register_forward_hook(
        lambda module, args, out: finite.append(torch.isfinite(out[0] if isinstance(out, tuple) else out).all()))
    frames = []
    try:
        first_s = timer(lambda: frames.append(decode_latents(vae, latents)))
    finally:
        hook.remove()
    for _ in range(max(warmup - 1, 0)):
        timer(lambda: decode_latents(vae, latents))
    times = time_calls(lambda: decode_latents(vae, latents), repeats, timer=timer)
    return dict(latent="x".join(map(str, latent)), frames="x".join(map(str, frames[0].shape[1:4])),
                build_s=build_s, first_call_s=first_s, median_s=statistics.median(times), min_s=min(times),
                times_s=times, chunks=len(finite), output_finite=bool(torch.stack(finite).all()))
