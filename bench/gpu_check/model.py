"""Section 1: the DiT of the run, with random weights, built on its device."""
import time

from bench.random_weights import build_random_dit
from bench.timing import synchronize


def build_dit(run) -> tuple:
    """(the run's DiT, built on run.device in run.dtype; the row describing it). Without it no other one-device
    section runs, so a failure here stops the command."""
    config = run.config
    clock = time.perf_counter()
    model = build_random_dit(config["params"], run.device, run.dtype)
    synchronize(run.device)
    n_params = sum(p.numel() for p in model.parameters())
    row = dict(config=run.config_name, params_billion=n_params / 1e9, weights_gib=n_params * run.dtype.itemsize / 2**30,
               latent="x".join(map(str, config["latent"])),
               tokens=f"{run.flops['visual_tokens']}+{config['text_tokens']}", build_s=time.perf_counter() - clock)
    return model, row
