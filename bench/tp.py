"""Tensor-parallel DiT on CPU ranks (gloo): time, communication and memory per TP degree.

    python bench/tp.py [--config mid|tiny] [--degrees 1 2 4] [--repeats 5] [--json out.json]

For each degree, fresh processes (one intra-op thread per rank) load the DiT from a
safetensors checkpoint with parallel.load (each rank reads only its slice), then time
`--repeats` forwards after a warm-up. Printed per degree: median forward time and the
speed-up over tp=1 measured in this run, collectives and bytes each rank sent per
forward, parameter bytes per rank, and each rank's peak RSS growth while loading.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.dit_forward import CONFIGS  # noqa: E402
from k4flash.dit import DiffusionTransformer3D  # noqa: E402
from k4flash.tiny import fill_deterministic_  # noqa: E402
from parallel.spawn import run_ranks  # noqa: E402


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


def _measure(config, load, repeats, barrier=None):
    """Load (peak RSS growth), one counted forward, then `repeats` timed forwards."""
    from parallel import comm

    before = _start_peak_window(config["params"])
    model = load()
    load_rss = _peak_growth_mb(before)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *config["latent"], generator=g)
    text = torch.randn(1, config["text_tokens"], config["params"]["in_text_dim"], generator=g)
    t = torch.tensor([749.0])
    times = []
    with torch.no_grad():
        model(x, text, t)  # warm-up
        comm.STATS.reset()
        model(x, text, t)
        calls, sent = dict(comm.STATS.calls), comm.STATS.bytes
        for _ in range(repeats):
            if barrier:
                barrier()  # start every rank's forward together
            start = time.perf_counter()
            model(x, text, t)
            times.append(time.perf_counter() - start)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(times=times, calls=calls, bytes=sent, param_bytes=param_bytes, load_rss_mb=load_rss)


def _rank_bench(runtime, config_name, checkpoint, repeats):
    from parallel.load import load_dit_sharded

    config = CONFIGS[config_name]
    return _measure(config, lambda: load_dit_sharded(config["params"], checkpoint, runtime.tp_mesh), repeats,
                    barrier=runtime.barrier)


def _one_rank_bench(config_name, checkpoint, repeats):
    """tp = 1: the plain model, no process group, one thread."""
    from k4flash.weights import load_dit

    torch.set_num_threads(1)
    config = CONFIGS[config_name]
    return _measure(config, lambda: load_dit(config["params"], checkpoint), repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    config = CONFIGS[args.config]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        model = fill_deterministic_(DiffusionTransformer3D(**config["params"]), seed=0)
        checkpoint = Path(tmp) / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        del model
        for degree in args.degrees:
            if degree == 1:
                per_rank = [run_ranks_single(args.config, checkpoint, args.repeats)]
            else:
                per_rank = run_ranks(degree, _rank_bench, args.config, str(checkpoint), args.repeats)
            # A TP forward is as slow as its slowest rank: take the per-repeat max, then the median.
            step_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]
            rows.append(dict(tp=degree, median_s=statistics.median(step_times), min_s=min(step_times),
                             calls=per_rank[0]["calls"], bytes_per_rank=per_rank[0]["bytes"],
                             param_bytes_per_rank=max(r["param_bytes"] for r in per_rank),
                             load_peak_rss_mb_per_rank=max(r["load_rss_mb"] for r in per_rank)))
    base = next((r["median_s"] for r in rows if r["tp"] == 1), None)
    print(f"config={args.config} float32 CPU, 1 thread per rank, {args.repeats} repeats after warm-up")
    print("| tp | forward median (s) | speed-up vs tp=1 | collectives / forward | MB sent / rank | "
          "param MB / rank | load peak RSS MB / rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = base / r["median_s"] if base else None
        calls = ", ".join(f"{n} {k}" for k, n in sorted(r["calls"].items())) or "0"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"| {r['tp']} | {r['median_s']:.3f} | {speedup} | {calls} | {r['bytes_per_rank'] / 2**20:.2f} | "
              f"{r['param_bytes_per_rank'] / 2**20:.1f} | {r['load_peak_rss_mb_per_rank']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=args.config, rows=rows), indent=2))


def run_ranks_single(config_name, checkpoint, repeats):
    """tp = 1 in a fresh process too, so its RSS figure is comparable."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_one_rank_bench, (config_name, str(checkpoint), repeats))


if __name__ == "__main__":
    main()
