"""The full-size DiT with random weights on one GPU: step latency and achieved TFLOP/s, eager and compiled.

    python -m bench.gpu_dit [--repeats 5] [--warmup 2] [--compile] [--json F] [--md F]       # needs CUDA
    python -m bench.gpu_dit --device cpu --config tiny                                      # CPU smoke test

The published DiT (5.5 B parameters) is built on the meta device, materialised on the GPU
with `to_empty`, cast to bf16 and filled with random weights there (no checkpoint, no
host copy), and run at the published geometry (latent 25 x 48 x 84 → 25,200 visual + 224
text tokens) under bf16 autocast, as the pipeline runs it. Each forward is one
denoising step; it is timed with CUDA events after `--warmup` calls. Achieved TFLOP/s
= the cost model's FLOPs of one forward (k4flash.cost.dit_flops) / the median. `--compile`
then compiles the blocks (DiffusionTransformer3D.compile_blocks), reports the first call
(the compile) on its own and times it the same way. `--device cpu --config tiny` runs the
same code on the tiny config, so CI exercises it.
"""
import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/gpu_dit.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, add_output_args  # noqa: E402
from k4flash.devices import DTYPES, resolve_dtype  # noqa: E402
from k4flash.dit import DiffusionTransformer3D  # noqa: E402
from k4flash.published import PUBLISHED_DIT_PARAMS  # noqa: E402
from k4flash.tiny import TINY_DIT_PARAMS  # noqa: E402
from k4flash import cost  # noqa: E402

CONFIGS = {
    "published": dict(params=PUBLISHED_DIT_PARAMS, latent=cost.PUBLISHED_LATENT, text_tokens=cost.TEXT_TOKENS),
    "tiny": dict(params=TINY_DIT_PARAMS, latent=(3, 8, 12), text_tokens=20),
}
TIMESTEP = 749.0


@torch.no_grad()
def build_random_dit(params, device, dtype, seed=0):
    """The DiT materialised directly on `device` in `dtype` with random weights (no host copy of the weights).

    Linear weights ~ N(0, 1/fan_in) so activations keep their scale through the blocks;
    the modulation layers 10x smaller so the gates stay small; biases 0; norms identity.
    """
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    model.to_empty(device=device).to(dtype)
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


class Timer:
    """CUDA events on a GPU (no host sync inside the timed region), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def measure(model, inputs, timer, warmup, repeats, autocast):
    def forward():
        with autocast():
            return model(*inputs)

    with torch.no_grad():
        first_s = timer(forward)  # the first call: RoPE tables, cuBLAS/cuDNN autotune, or the compile
        for _ in range(max(warmup - 1, 0)):
            timer(forward)
        times = [timer(forward) for _ in range(repeats)]
        out = forward()
    return dict(first_call_s=first_s, times_s=times, median_s=statistics.median(times), min_s=min(times),
                output_finite=bool(torch.isfinite(out).all()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="published")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="the CLI's dtype names; auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd blocks")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense peak for the MFU column (default: H100 SXM's 989.4 on an H100)")
    add_output_args(parser)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench.gpu_dit needs a CUDA device and none is visible; "
              "`python -m bench.gpu_dit --device cpu --config tiny` runs the same code path on the CPU",
              file=sys.stderr)
        sys.exit(2)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(args.dtype, device)
    config = CONFIGS[args.config]
    params, latent, text_tokens = config["params"], config["latent"], config["text_tokens"]
    flops = cost.dit_flops(params, latent, text_tokens)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (cost.H100_SXM.peak_bf16_flops if "H100" in card else None)

    model = build_random_dit(params, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the build's float32 staging is not the forward's memory
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, *latent, params["in_visual_dim"], device=device, generator=generator, dtype=dtype)
    text = torch.randn(1, text_tokens, params["in_text_dim"], device=device, generator=generator, dtype=dtype)
    t = torch.full((1,), TIMESTEP, device=device)
    # As the pipeline: bf16/fp16 weights under autocast (LayerNorms in float32), nothing for fp32.
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device_type=device.type, dtype=dtype))
    timer = Timer(device)
    report = Report("gpu_dit", config=args.config, device=card, dtype=str(dtype).replace("torch.", ""),
                    latent=latent, tokens=f"{flops['visual_tokens']}+{text_tokens}", warmup=args.warmup,
                    repeats=args.repeats, params_billion=round(sum(p.numel() for p in model.parameters()) / 1e9, 3))
    rows = [dict(variant="eager", **measure(model, (x, text, t), timer, args.warmup, args.repeats, autocast))]
    if args.compile:
        model.compile_blocks()
        rows.append(dict(variant="torch.compile (inductor)",
                         **measure(model, (x, text, t), timer, args.warmup, args.repeats, autocast)))
    for row in rows:
        row["tflops"] = flops["total"] / row["median_s"] / 1e12
        row["mfu"] = flops["total"] / row["median_s"] / peak if peak else None
        row["four_steps_s"] = cost.NUM_STEPS * row["median_s"]
    if device.type == "cuda":
        report.settings["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report.table(f"DiT forward = one denoising step on {card}", [
        ("variant", "variant", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
        ("first_call_s", "first call s", ".2f"), ("tflops", "achieved TFLOP/s", ".3g"), ("mfu", "MFU", ".1%"),
        ("four_steps_s", f"{cost.NUM_STEPS} steps s", ".3f"), ("output_finite", "output finite", None)], rows)
    report.note(f"FLOPs per forward (k4flash.cost.dit_flops): {flops['total'] / 1e12:.4g} TFLOP "
                f"({flops['linear'] / 1e12:.4g} linear + {flops['attention'] / 1e12:.4g} attention)"
                + (f"; MFU against {peak / 1e12:.1f} TFLOP/s dense peak" if peak else ""))
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
