"""DiT forward time on CPU: ours eager, ours torch.compile'd, and the literal reference forward
(k4flash/reference.py), in one run.

    python -m bench.dit_forward [--config mid|tiny] [--threads 1] [--repeats 5] [--compile] [--no-reference]
                                [--json F] [--md F]

Random non-zero weights (k4flash.tiny.fill_deterministic_), float32, no_grad. Ours: one
warm-up call, then `--repeats` timed calls. `--compile` then compiles the blocks in place
(DiffusionTransformer3D.compile_blocks), times the first call (the compile) on its own and
`--repeats` calls after it. `k4flash.reference.reference_forward` (separate visual/text
passes, RoPE tables rebuilt per call) runs on the same weights and inputs once, plus a
second time if the first took < 60 s; its output also checks ours. Ratios are medians
measured in this process.
"""
import argparse
import statistics

import torch

from bench.configs import DIT_CONFIGS, TIMESTEP, dit_inputs
from bench.report import Report, add_output_args
from bench.timing import timed
from k4flash.dit import DiffusionTransformer3D
from k4flash.reference import reference_forward
from k4flash.tiny import fill_deterministic_

CONFIG_NAMES = ("mid", "tiny")  # of bench.configs.DIT_CONFIGS: what a CPU runs in seconds
REFERENCE_SECOND_RUN_LIMIT_S = 60.0


def _row(variant, times, out, baseline_out, first_call_s=None):
    return dict(variant=variant, median_s=statistics.median(times), min_s=min(times), times_s=times,
                first_call_s=first_call_s,
                max_abs_diff=None if baseline_out is None else (out - baseline_out).abs().max().item())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIG_NAMES, default="mid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd blocks")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference baseline")
    add_output_args(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = DIT_CONFIGS[args.config]
    params = config["params"]
    model = fill_deterministic_(DiffusionTransformer3D(**params), seed=0).eval()
    x, text, timestep = dit_inputs(config)
    grid = [s // p for s, p in zip(config["latent"], params["patch_size"])]
    report = Report("dit_forward", config=args.config, dtype="float32", threads=args.threads, repeats=args.repeats,
                    tokens=f"{grid[0] * grid[1] * grid[2]}+{config['text_tokens']}", params=params)
    rows = []
    with torch.no_grad():
        model(x, text, timestep)  # warm-up (also builds the RoPE tables)
        eager_out, times = timed(lambda: model(x, text, timestep), args.repeats)
        rows.append(_row("ours, eager", times, eager_out, None))
        if not args.no_reference:
            state_dict = model.state_dict()

            def reference():
                return reference_forward(state_dict, params, x[0], text[0], TIMESTEP)[None]
            ref_out, ref_times = timed(reference, 1)
            if ref_times[0] < REFERENCE_SECOND_RUN_LIMIT_S:
                ref_times += timed(reference, 1)[1]
            else:
                report.note(f"reference took {ref_times[0]:.1f} s (> {REFERENCE_SECOND_RUN_LIMIT_S:.0f} s): run once")
            rows.append(_row("literal reference (k4flash/reference.py)", ref_times, ref_out, eager_out))
        if args.compile:
            model.compile_blocks(backend=args.backend)
            _, (first_s,) = timed(lambda: model(x, text, timestep), 1)
            compiled_out, times = timed(lambda: model(x, text, timestep), args.repeats)
            rows.append(_row(f"ours, torch.compile ({args.backend})", times, compiled_out, eager_out, first_s))
    eager_median = rows[0]["median_s"]
    for row in rows:
        row["vs_eager"] = row["median_s"] / eager_median
    report.table("DiT forward (one video, batch 1)",
                 [("variant", "variant", None), ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"),
                  ("vs_eager", "time / ours eager", ".2f"), ("first_call_s", "first call s (compile)", ".1f"),
                  ("max_abs_diff", "max abs diff vs eager", ".1e")], rows)
    report.note("all timings (s): " + "; ".join(f"{r['variant']}: " + " ".join(f"{t:.3f}" for t in r["times_s"])
                                                for r in rows))
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
