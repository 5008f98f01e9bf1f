"""Tensor-parallel DiT per TP degree: forward time and speed-up, collectives and bytes, parameter bytes, load RSS.

    python -m bench.tp [--config mid|tiny] [--degrees 1 2 4] [--repeats 5] [--compile] [--device cpu|cuda]
                       [--json F] [--md F]

For each degree, fresh processes load the DiT from a safetensors checkpoint with
parallel.load (each rank reads only its slice), then time `--repeats` forwards after a
warm-up. CPU: gloo ranks with one intra-op thread each, float32. `--device cuda`: rank r
on cuda:r over NCCL, bf16 weights under bf16 autocast (as the pipeline). `--compile`
compiles the blocks after loading (collectives stay eager, parallel/comm.py); the first
call, which compiles, is reported on its own. Per degree: median forward time (the
slowest rank of each repeat) and the speed-up over tp=1 measured in this run, collectives
and bytes each rank sent per forward (parallel.comm.STATS), parameter bytes per rank, and
each rank's peak RSS growth while loading.
"""
import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/tp.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_forward import CONFIGS, config_inputs  # noqa: E402
from bench.report import Report, add_output_args, time_calls  # noqa: E402
from k4flash.dit import DiffusionTransformer3D  # noqa: E402
from k4flash.tiny import fill_deterministic_  # noqa: E402
from tests.spawn import run_ranks  # noqa: E402


def _status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _start_peak_window(params):
    """Reset the kernel's peak-RSS mark (VmHWM) so the next peak is the loading's own; returns RSS now.

    A meta-device build first pays the one-time lazy initialisation (~70 MB here), which
    is not loading.
    """
    with torch.device("meta"):
        DiffusionTransformer3D(**params)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_growth_mb(rss_before):
    return _status_mb("VmHWM") - rss_before


def _measure(config, load, repeats, device, compile_blocks, barrier=None):
    """Load (peak RSS growth), one counted forward, then `repeats` timed forwards."""
    from parallel import comm

    before = _start_peak_window(config["params"])
    model = load()
    load_rss = _peak_growth_mb(before)
    if compile_blocks:
        model.compile_blocks()
    x, text, t = (v.to(device) for v in config_inputs(config, seed=0))
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def forward():
        with autocast:
            model(x, text, t)
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        start = time.perf_counter()
        forward()  # warm-up (and the compile)
        first_s = time.perf_counter() - start
        comm.STATS.reset()
        forward()
        calls, sent = dict(comm.STATS.calls), comm.STATS.bytes
        times = time_calls(forward, repeats, barrier)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(times=times, first_s=first_s, calls=calls, bytes=sent, param_bytes=param_bytes, load_rss_mb=load_rss)


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _rank_bench(runtime, config_name, checkpoint, repeats, compile_blocks):
    from parallel.load import load_dit_sharded

    config = CONFIGS[config_name]
    load = lambda: load_dit_sharded(config["params"], checkpoint, runtime.tp_mesh, device=runtime.device,  # noqa: E731
                                    dtype=_dtype(runtime.device))
    return _measure(config, load, repeats, runtime.device, compile_blocks, barrier=runtime.barrier)


def _one_rank_bench(config_name, checkpoint, repeats, device_type, compile_blocks):
    """tp = 1: the plain model, no process group, one thread."""
    from k4flash.weights import load_dit

    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    config = CONFIGS[config_name]
    return _measure(config, lambda: load_dit(config["params"], checkpoint, device=device, dtype=_dtype(device)),
                    repeats, device, compile_blocks)


def run_ranks_single(*args):
    """tp = 1 in a fresh process too, so its RSS figure is comparable."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_one_rank_bench, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks on every rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.degrees):
        parser.error(f"--device cuda needs {max(args.degrees)} GPUs, {torch.cuda.device_count()} visible")

    config = CONFIGS[args.config]
    report = Report("tp", config=args.config, device=args.device,
                    dtype="bf16 autocast" if args.device == "cuda" else "float32",
                    backend="nccl" if args.device == "cuda" else "gloo, 1 thread per rank",
                    repeats=args.repeats, compile=args.compile)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        model = fill_deterministic_(DiffusionTransformer3D(**config["params"]), seed=0)
        checkpoint = Path(tmp) / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        del model
        for degree in args.degrees:
            if degree == 1:
                per_rank = [run_ranks_single(args.config, str(checkpoint), args.repeats, args.device, args.compile)]
            else:
                per_rank = run_ranks(degree, _rank_bench, args.config, str(checkpoint), args.repeats, args.compile,
                                     device=args.device)
            # A TP forward is as slow as its slowest rank: take the per-repeat max, then the median.
            step_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]
            rows.append(dict(tp=degree, median_s=statistics.median(step_times), min_s=min(step_times),
                             times_s=step_times, first_call_s=max(r["first_s"] for r in per_rank),
                             calls=per_rank[0]["calls"], bytes_per_rank=per_rank[0]["bytes"],
                             param_bytes_per_rank=max(r["param_bytes"] for r in per_rank),
                             load_peak_rss_mb_per_rank=max(r["load_rss_mb"] for r in per_rank)))
    base = next((r["median_s"] for r in rows if r["tp"] == 1), None)
    for r in rows:
        r["speedup"] = base / r["median_s"] if base else None
        r["collectives"] = ", ".join(f"{n} {k}" for k, n in sorted(r["calls"].items())) or "0"
    report.table("Tensor-parallel DiT forward", [
        ("tp", "tp", None), ("median_s", "forward median s", ".3f"), ("speedup", "speed-up vs tp=1", ".2f"),
        ("first_call_s", "first call s", ".2f"), ("collectives", "collectives / forward", None),
        ("bytes_per_rank", "MB sent / rank", lambda b: f"{b / 2**20:.2f}"),
        ("param_bytes_per_rank", "param MB / rank", lambda b: f"{b / 2**20:.1f}"),
        ("load_peak_rss_mb_per_rank", "load peak RSS MB / rank", ".1f")], rows)
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
