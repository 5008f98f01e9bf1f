"""Section 8: tp = N against tp = 1 in the same N processes: the sharded forward's parity and its speed-up."""
import statistics

import torch

from bench.configs import autocast_for, dit_inputs
from bench.gpu_check.run import CONFIGS, compare
from bench.random_weights import build_random_dit
from bench.timing import Timer, slowest_rank_times, time_calls
from parallel.spawn import run_ranks


def _timed_forwards(forward, timer, warmup, repeats, barrier=None):
    with torch.no_grad():
        for _ in range(warmup):
            timer(forward)
        return time_calls(forward, repeats, barrier, timer)  # barrier: every rank starts the step together


def sharded_rank(runtime, config_name, warmup, repeats):
    """One rank: the full model alone (one GPU), then sharded by the runtime's plan (TP, sequence-parallel TP,
    Ulysses or both) over its model group; the same inputs."""
    import torch.distributed as dist

    from parallel.tp import parallelize_dit

    device = runtime.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CONFIGS[config_name]
    model = build_random_dit(config["params"], device, dtype)
    with torch.no_grad():
        for param in model.parameters():  # the same weights everywhere, whatever each device's generator does
            dist.broadcast(param, src=0)
    x, text, t = dit_inputs(config, device, dtype)
    autocast = autocast_for(device, dtype)

    def forward():
        with autocast():
            return model(x, text, t)

    timer = Timer(device)
    one_times = _timed_forwards(forward, timer, warmup, repeats)
    with torch.no_grad():
        reference = forward().float()
    parallelize_dit(model, runtime.dit_mesh, sequence_parallel=runtime.sequence_parallel)  # the runtime's plan
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the full weights are gone; leave the shard's peak clean
        torch.cuda.reset_peak_memory_stats(device)
    sharded_times = _timed_forwards(forward, timer, warmup, repeats, barrier=runtime.barrier)
    with torch.no_grad():
        out = forward().float()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(one_times=one_times, sharded_times=sharded_times, finite=bool(torch.isfinite(out).all()),
                sharded_peak_gib=peak, **compare(out, reference))


def tensor_parallel_rows(world, config_name, device_type, warmup, repeats):
    """Section 8: a tp = 1 row and a tp = `world` row, measured on `world` ranks (NCCL on cuda, gloo on cpu)."""
    per_rank = run_ranks(world, sharded_rank, config_name, warmup, repeats, device=device_type, timeout=600)
    one = per_rank[0]["one_times"]
    sharded = slowest_rank_times(r["sharded_times"] for r in per_rank)
    worst = max(per_rank, key=lambda r: r["rel_l2_err"])
    base = statistics.median(one)
    peaks = [r["sharded_peak_gib"] for r in per_rank if r["sharded_peak_gib"] is not None]
    return [dict(tp=1, median_s=base, min_s=min(one), speedup=1.0, max_rel_err=0.0, rel_l2_err=0.0, finite=True,
                 peak_gib=None),
            dict(tp=world, median_s=statistics.median(sharded), min_s=min(sharded),
                 speedup=base / statistics.median(sharded), max_rel_err=worst["max_rel_err"],
                 rel_l2_err=worst["rel_l2_err"], finite=all(r["finite"] for r in per_rank),
                 peak_gib=max(peaks) if peaks else None)]
