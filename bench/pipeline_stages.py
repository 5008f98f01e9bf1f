"""Pipeline stage times on the tiny model: T5 encode, DiT denoise, VAE decode, MP4 write, end-to-end.

    python -m bench.pipeline_stages [--time-length 1] [--width 672] [--height 384] [--repeats 3] [--warmup 1]
                                    [--threads 1] [--compile] [--json F] [--md F]

The real code path (get_T2V_pipeline → generate → write_outputs) on the built-in tiny
model (k4flash.tiny: the published formats at tiny widths, cached in $K4FLASH_CACHE), on
CPU in float32. `--warmup` untimed generations (default 1), then `--repeats` timed
ones; each stage's median comes from the pipeline's own timings (Generation.timings, write_s), end-to-end is the
wall time of generate + write. The tiny model's split between stages is not the
published model's (see bench.cost_model): this measures the pipeline's overheads.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.report import Report, add_output_args
from k4flash.geometry import latent_shape
from k4flash.tiny import TINY_DIT_PARAMS, ensure_tiny_weights

STAGES = [("text_encode_s", "T5 encode"), ("denoise_s", "DiT denoise (4 steps)"), ("decode_s", "VAE decode"),
          ("write_s", "MP4 write"), ("end_to_end_s", "end-to-end (generate + write)")]
PROMPT = "a red fox runs through fresh snow"


def run_once(pipe, request, save_path) -> dict:
    start = time.perf_counter()
    generation = pipe.generate(**request, progress=False)
    pipe.write_outputs(generation, save_path, overwrite=True)
    end_to_end = time.perf_counter() - start
    timings = dict(generation.timings)
    # write_outputs records write_s in the sidecar only; read it back from there.
    sidecar = json.loads(save_path.with_suffix(".json").read_text())
    timings["write_s"] = sidecar["timings"]["write_s"]
    timings["end_to_end_s"] = end_to_end
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-length", type=int, default=1)
    parser.add_argument("--width", type=int, default=672)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations first (0: CI smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="get_T2V_pipeline(compile=True)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.time_length < 1:
        parser.error("--time-length must be >= 1 (a video; 0 writes a PNG, not an MP4)")

    torch.set_num_threads(args.threads)
    from k4flash import get_T2V_pipeline

    weights = ensure_tiny_weights()
    start = time.perf_counter()
    pipe = get_T2V_pipeline("cpu", cache_dir=weights, dit_params=TINY_DIT_PARAMS, download=False,
                            compile=args.compile)
    load_s = time.perf_counter() - start
    request = dict(text=PROMPT, time_length=args.time_length, width=args.width, height=args.height, seed=42)
    frames, h, w, _ = latent_shape(args.time_length, args.height, args.width)
    report = Report("pipeline_stages", model="tiny (untrained)", dtype="float32", threads=args.threads,
                    repeats=args.repeats, compile=args.compile,
                    video=f"{args.time_length} s {args.width}x{args.height}",
                    latent=f"{frames}x{h}x{w}", dit_tokens=f"{frames * h * w // 4}+224")
    with tempfile.TemporaryDirectory() as tmp:
        save_path = Path(tmp) / "bench.mp4"
        warmups = [run_once(pipe, request, save_path) for _ in range(args.warmup)]
        runs = [run_once(pipe, request, save_path) for _ in range(args.repeats)]
    rows = []
    for key, stage in STAGES:
        times = [r[key] for r in runs]
        rows.append(dict(stage=stage, key=key, median_s=statistics.median(times), min_s=min(times), times_s=times,
                         warmup_s=warmups[0][key] if warmups else None))
    total = next(r["median_s"] for r in rows if r["key"] == "end_to_end_s")
    for row in rows:
        row["share"] = row["median_s"] / total
    rows.append(dict(stage="load (T5, DiT, VAE; once)", key="load_s", median_s=load_s, min_s=load_s, times_s=[load_s]))
    report.table("Stages of one generation", [
        ("stage", "stage", None), ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"),
        ("share", "share of end-to-end", ".2f"), ("warmup_s", "warm-up run s", ".3f")], rows)
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
