"""Time one DiT forward on CPU, with SPEC's literal formulation as an in-run baseline.

    python bench/dit_forward.py [--config mid|tiny] [--threads 1] [--repeats 5] [--json out.json] [--no-reference]

Random non-zero weights (k4flash.tiny.fill_deterministic_), float32, no_grad, one
warm-up call, then `--repeats` timed calls. `k4flash.reference.reference_forward` runs
on the same weights and inputs (once, plus a second time if the first took < 60 s) and
the speed-up is measured in the same process; its output also checks the fast path.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from k4flash.dit import DiffusionTransformer3D  # noqa: E402
from k4flash.reference import reference_forward  # noqa: E402
from k4flash.tiny import TINY_DIT_PARAMS, fill_deterministic_  # noqa: E402

CONFIGS = {
    # 8 heads of 64; 5 x 16 x 24 = 1920 visual tokens + 64 text tokens.
    "mid": dict(params=dict(in_visual_dim=16, in_text_dim=256, out_visual_dim=16, time_dim=512, patch_size=(1, 2, 2),
                            model_dim=512, ff_dim=2048, num_blocks=2, axes_dims=(16, 24, 24)),
                latent=(5, 32, 48, 16), text_tokens=64),
    "tiny": dict(params=TINY_DIT_PARAMS, latent=(3, 8, 12, 16), text_tokens=20),
}
REFERENCE_SECOND_RUN_LIMIT_S = 60.0
TIMESTEP = 749.0


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference baseline")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    params = config["params"]
    model = fill_deterministic_(DiffusionTransformer3D(**params), seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, *config["latent"], generator=generator)
    text = torch.randn(1, config["text_tokens"], params["in_text_dim"], generator=generator)
    timestep = torch.tensor([TIMESTEP])

    with torch.no_grad():
        model(x, text, timestep)  # warm-up (also builds the RoPE tables)
        out, times = timed(lambda: model(x, text, timestep), args.repeats)

        ref_times, max_abs_diff = [], None
        if not args.no_reference:
            state_dict = model.state_dict()
            ref, ref_times = timed(lambda: reference_forward(state_dict, params, x[0], text[0], TIMESTEP), 1)
            if ref_times[0] < REFERENCE_SECOND_RUN_LIMIT_S:
                ref_times += timed(lambda: reference_forward(state_dict, params, x[0], text[0], TIMESTEP), 1)[1]
            else:
                print(f"note: reference took {ref_times[0]:.1f} s (> {REFERENCE_SECOND_RUN_LIMIT_S:.0f} s), run once")
            max_abs_diff = (out[0] - ref).abs().max().item()

    grid = [s // p for s, p in zip(config["latent"][:3], params["patch_size"])]
    result = {
        "config": args.config, "params": params, "latent": config["latent"], "text_tokens": config["text_tokens"],
        "visual_tokens": grid[0] * grid[1] * grid[2], "threads": args.threads, "dtype": "float32",
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "loadavg_1m": os.getloadavg()[0],  # other processes on the machine skew the timings
        "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
    }
    if ref_times:
        result.update(reference_median_s=statistics.median(ref_times), reference_times_s=ref_times,
                      speedup_vs_reference=statistics.median(ref_times) / result["median_s"],
                      max_abs_diff_vs_reference=max_abs_diff)

    ref_cells = ("{reference_median_s:.3f} | {speedup_vs_reference:.2f}x | {max_abs_diff_vs_reference:.1e}"
                 .format(**result) if ref_times else "- | - | -")
    print("| config | threads | tokens (visual+text) | median s | min s | reference s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {args.threads} | {result['visual_tokens']}+{config['text_tokens']} "
          f"| {result['median_s']:.3f} | {result['min_s']:.3f} | {ref_cells} |")
    print("all timings (s):", " ".join(f"{t:.3f}" for t in times), f"(load average {result['loadavg_1m']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
