"""The full-size DiT with random weights on one GPU: step latency and achieved TFLOP/s, eager and compiled.

    python -m bench.gpu_dit [--repeats 5] [--warmup 2] [--compile] [--json F] [--md F]       # needs CUDA
    python -m bench.gpu_dit --device cpu --config tiny                                      # CPU smoke test

The published DiT (5.5 B parameters) is built on the meta device, materialised on the GPU
with `to_empty`, cast to bf16 and filled with random weights there (no checkpoint, no
host copy), and run at the published geometry (latent 25 x 48 x 84 → 25,200 visual + 224
text tokens) under bf16 autocast, as the pipeline runs it. Each forward is one
denoising step; it is timed with CUDA events after `--warmup` calls. Achieved TFLOP/s
= the cost model's FLOPs of one forward (parallel.cost.dit_flops) / the median. `--compile`
then compiles the blocks (DiffusionTransformer3D.compile_blocks), reports the first call
(the compile) on its own and times it the same way. `--device cpu --config tiny` runs the
same code on the tiny config, so CI exercises it.
"""
import argparse
import sys

import torch

from bench.configs import DIT_CONFIGS, autocast_for, dit_inputs
from bench.random_weights import build_random_dit
from bench.report import Report, add_output_args
from bench.timing import Timer, measure
from k4flash.devices import DTYPES, resolve_dtype
from parallel import cost

CONFIG_NAMES = ("published", "tiny")  # of bench.configs.DIT_CONFIGS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIG_NAMES, default="published")
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
    config = DIT_CONFIGS[args.config]
    params, latent, text_tokens = config["params"], config["latent"], config["text_tokens"]
    flops = cost.dit_flops(params, latent, text_tokens)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (cost.H100_SXM.peak_bf16_flops if "H100" in card else None)

    model = build_random_dit(params, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the build's peak is not the forward's memory
    x, text, t = dit_inputs(config, device, dtype)
    autocast = autocast_for(device, dtype)
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
    report.note(f"FLOPs per forward (parallel.cost.dit_flops): {flops['total'] / 1e12:.4g} TFLOP "
                f"({flops['linear'] / 1e12:.4g} linear + {flops['attention'] / 1e12:.4g} attention)"
                + (f"; MFU against {peak / 1e12:.1f} TFLOP/s dense peak" if peak else ""))
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
