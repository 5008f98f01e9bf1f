"""What every section of the check shares: its configs, what a run measures on (`Run`), the progress log, and
how an output is compared with its reference."""
import os
import sys
import time
from dataclasses import dataclass

import torch

from bench.configs import DIT_CONFIGS, VAE_CONFIGS
from bench.gpu_check.peaks import peak_tflops
from parallel import cost

# DIT_CONFIGS' published and tiny DiTs, each with the reduced geometry of section 2 and the VAE of section 4.
# fidelity_latent: 3 frames of 48 x 84 → 3,024 + 224 tokens; 48 heads of fp32 scores = 1.9 GiB per copy.
CONFIGS = {
    "published": dict(DIT_CONFIGS["published"], fidelity_latent=(3, 48, 84), vae=VAE_CONFIGS["published"],
                      vae_latent=cost.PUBLISHED_LATENT),
    "tiny": dict(DIT_CONFIGS["tiny"], fidelity_latent=(3, 8, 12), vae=VAE_CONFIGS["tiny"], vae_latent=(3, 8, 12)),
}
# The command's start (set by the command, inherited by its section processes): one clock for every progress line.
STARTED_ENV = "K4FLASH_GPU_CHECK_T0"
# When a section's process is stopped (time.time(); set by the command for each section: --budget-s, --section-cap-s).
DEADLINE_ENV = "K4FLASH_GPU_CHECK_DEADLINE"
IMPORTED = time.time()


def log(message):
    """Progress on stderr: an 8-minute run should show where it is."""
    elapsed = time.time() - float(os.environ.get(STARTED_ENV, IMPORTED))
    sys.stderr.write(f"[gpu_check {elapsed:6.1f} s] {message}\n")
    sys.stderr.flush()


def seconds_left():
    """Seconds until this section's process is stopped (None outside a section run by the command), so a section
    can leave out an optional part that would not fit rather than lose every figure it has."""
    deadline = os.environ.get(DEADLINE_ENV)
    return None if deadline is None else float(deadline) - time.time()


@dataclass
class Run:
    """What this run measures on: the device, the config and what follows from them."""
    device: torch.device
    config_name: str
    dtype: torch.dtype
    world: int  # ranks for sections 8 and 9
    compile_backend: str
    card: str
    peak_flops: float  # the card's dense bf16 peak for MFU (bench/gpu_check/peaks.py); None where unknown

    @property
    def config(self) -> dict:
        return CONFIGS[self.config_name]

    @property
    def flops(self) -> dict:
        return cost.dit_flops(self.config["params"], self.config["latent"], self.config["text_tokens"])


def resolve_run(parser, args) -> Run:
    """The Run the command line asks for; exits with status 2 when it asks for CUDA and there is none."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench.gpu_check needs a CUDA device and none is visible; "
              "`python -m bench.gpu_check --smoke` runs the same code paths on the CPU", file=sys.stderr)
        sys.exit(2)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        card = f"CPU ({torch.get_num_threads()} threads)"
        world = args.gpus or 1
    else:
        device = torch.device("cuda", 0 if device.index is None else device.index)
        torch.cuda.set_device(device)
        card = torch.cuda.get_device_name(device)
        world = args.gpus if args.gpus is not None else torch.cuda.device_count()
        if world > torch.cuda.device_count():
            parser.error(f"--gpus {world}: {torch.cuda.device_count()} GPUs visible")
    peak = peak_tflops(card, args.peak_tflops)["bf16"]
    peak = peak * 1e12 if peak else None
    return Run(device, args.config or ("published" if device.type == "cuda" else "tiny"),
               torch.bfloat16 if device.type == "cuda" else torch.float32, world,
               args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"), card, peak)


def compare(out, ref) -> dict:
    """How far `out` is from `ref`, in float64: max abs error, it over max |ref|, relative L2 error."""
    diff = out.double() - ref.double()
    ref_max = ref.double().abs().max()
    return dict(max_abs_err=float(diff.abs().max()), max_rel_err=float(diff.abs().max() / ref_max),
                rel_l2_err=float(diff.norm() / ref.double().norm()), ref_max_abs=float(ref_max))
