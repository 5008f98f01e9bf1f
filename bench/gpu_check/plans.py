"""Section 11: the other parallel plans on N ranks, each against one GPU: sequence-parallel TP, Ulysses, Ulysses x
TP, and the row-split VAE decode. Under NCCL these are the paths that have never run: all_to_all_single (Ulysses),
the token gather / reduce-scatter (sequence parallel), and the VAE's halo and uint8 gathers.

Every plan starts its own N ranks (parallel.spawn.run_ranks), builds the published DiT (or the tiny one with
--smoke) with the same weights on every rank, runs one forward whole and one sharded, and reports the sharded one's
error and speed-up; the VAE row compares the decoded frames of one rank with the row-split decode's.
"""
import statistics

import torch

from bench.configs import dit_inputs
from bench.gpu_check.run import CONFIGS, log
from bench.random_weights import build_random_vae
from bench.timing import Timer, slowest_rank_times, time_calls
from parallel.plan import validate_plan_degrees
from parallel.spawn import run_ranks


def plan_list(world: int) -> list:
    """(label, run_ranks keywords) of the plans to compare with one GPU on `world` ranks (tp alone is section 8)."""
    plans = [(f"tp={world}, sequence parallel", dict(tp=world, sequence_parallel=True)),
             (f"ulysses={world}", dict(tp=1, ulysses=world))]
    if world >= 4 and world % 2 == 0:
        plans.append((f"ulysses=2 x tp={world // 2}", dict(tp=world // 2, ulysses=2)))
    return plans


def _plan_row(world, config_name, device_type, warmup, repeats, label, degrees) -> dict:
    from bench.gpu_check.tp import sharded_rank
    try:  # a plan this config's heads or widths cannot take is a row saying so, not a failure
        validate_plan_degrees(CONFIGS[config_name]["params"], degrees["tp"], degrees.get("ulysses", 1))
    except ValueError as err:
        return dict(plan=label, note=str(err)[:160])
    log(f"11. {label} on {world} ranks")
    per_rank = run_ranks(world, sharded_rank, config_name, warmup, repeats, device=device_type, timeout=600,
                         **degrees)
    one = statistics.median(per_rank[0]["one_times"])
    sharded = slowest_rank_times(r["sharded_times"] for r in per_rank)
    worst = max(per_rank, key=lambda r: r["rel_l2_err"])
    peaks = [r["sharded_peak_gib"] for r in per_rank if r["sharded_peak_gib"] is not None]
    return dict(plan=label, median_s=statistics.median(sharded), one_gpu_s=one, speedup=one / statistics.median(sharded),
                max_rel_err=worst["max_rel_err"], rel_l2_err=worst["rel_l2_err"],
                finite=all(r["finite"] for r in per_rank), peak_gib=max(peaks) if peaks else None)


def _vae_rank(runtime, config_name, repeats):
    """One rank: the VAE decode alone, then row-split over the model group; the same weights and latents."""
    import torch.distributed as dist

    from k4flash.vae import decode_latents
    from parallel.vae import decode_latents_parallel, parallelize_vae

    device = runtime.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CONFIGS[config_name]
    vae = build_random_vae(config["vae"], device, dtype)
    with torch.no_grad():
        for param in vae.parameters():
            dist.broadcast(param, src=0)
    latents = dit_inputs(dict(config, latent=config["vae_latent"]), device, dtype)[0][0].float()  # (F, h, w, 16)
    timer = Timer(device)
    with torch.no_grad():
        whole = decode_latents(vae, latents)
        one_times = time_calls(lambda: decode_latents(vae, latents), repeats, timer=timer)
        parallelize_vae(vae, runtime)
        split = [None]

        def decode():
            split[0] = decode_latents_parallel(vae, latents)
        split_times = time_calls(decode, repeats, runtime.barrier, timer)
    frames = split[0]
    if frames is None:  # this rank returns no frames (only the group's first does)
        return dict(one_times=one_times, split_times=split_times, diff=None)
    return dict(one_times=one_times, split_times=split_times, frames="x".join(map(str, frames.shape[1:4])),
                diff=int((frames.int() - whole.int()).abs().max()))


def _vae_row(world, config_name, device_type, repeats) -> dict:
    log(f"11. row-split VAE decode on {world} ranks")
    per_rank = run_ranks(world, _vae_rank, config_name, repeats, device=device_type, timeout=600)
    first = per_rank[0]
    one = statistics.median(first["one_times"])
    split = statistics.median(slowest_rank_times(r["split_times"] for r in per_rank))
    return dict(plan=f"VAE decode, rows split over {world}", median_s=split, one_gpu_s=one, speedup=one / split,
                frames=first.get("frames"), max_frame_diff=first["diff"], finite=first["diff"] is not None)


def plan_rows(world, config_name, device_type, warmup, repeats, vae_repeats) -> list:
    rows = [_plan_row(world, config_name, device_type, warmup, repeats, label, degrees)
            for label, degrees in plan_list(world)]
    return rows + [_vae_row(world, config_name, device_type, vae_repeats)]
