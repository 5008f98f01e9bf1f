"""Row-parallel VAE decode on CPU ranks (gloo): decode time, peak memory and traffic per number of ranks.

    python -m bench.vae_decode [--config mid|tiny] [--ranks 1 2 4] [--repeats 3] [--json out.json] [--md out.md]

For each rank count, fresh processes (one intra-op thread per rank) build the same deterministic
random-weight AutoencoderKLCogVideoX, wrap it with parallel.vae.parallelize_vae (ranks > 1), and
decode the same latents `--repeats` times after a warm-up, through decode_latents (1 rank) or
decode_latents_parallel (uint8 frames gathered on rank 0). Printed per rank count: median decode
time (slowest rank per repeat) and speed-up over 1 rank measured in this run, collectives and MB
each rank sent per decode, each rank's peak RSS growth during a decode (max over ranks) next to the
memory model's count of a band's decode (parallel.counting.vae_decode_peak_bytes on the meta device), and how
many uint8 values differ from the 1-rank frames.

CPU caveat: with one thread, PyTorch runs a batch-1 conv3d through oneDNN only when
N·C·T·H exceeds ~20k and otherwise through slow_conv3d (im2col: ~2.5x slower per FLOP and a
large column buffer). A band has fewer rows, so too small a geometry pushes the bands, not the
full frame, onto the slow path; the default latents (3, 64, 24) keep the large levels on oneDNN
up to 4 ranks. GPUs (cuDNN) have no such switch.
"""
import argparse
import statistics

import torch

from bench.configs import VAE_CONFIGS
from bench.host_memory import peak_growth_mb, reset_peak_rss, status_mb
from bench.ranks import in_fresh_process
from bench.report import Report, add_output_args
from bench.timing import slowest_rank_times, time_calls
from k4flash.tiny import fill_deterministic_
from parallel.counting import vae_decode_peak_bytes
from parallel.spawn import run_ranks

CONFIG_NAMES = ("mid", "tiny")  # of bench.configs.VAE_CONFIGS
LATENT = (3, 64, 24)  # (frames, height, width) → 9 frames of 512 x 192


def _build(config_name):
    from diffusers import AutoencoderKLCogVideoX

    with torch.random.fork_rng(devices=[]):
        vae = AutoencoderKLCogVideoX(**VAE_CONFIGS[config_name])
    fill_deterministic_(vae, seed=1)
    with torch.no_grad():
        for parameter in vae.decoder.conv_out.parameters():  # outputs mostly in [-1, 1], as in k4flash.tiny
            parameter.mul_(0.3)
    frames, height, width = LATENT
    latents = torch.randn(frames, height, width, 16, generator=torch.Generator().manual_seed(0))
    return vae.eval().requires_grad_(False), latents


def _measure(decode, repeats, barrier=None):
    from parallel import comm

    frames = decode()  # warm-up
    comm.STATS.reset()
    reset_peak_rss()  # the next peak is a decode's own
    before = status_mb("VmRSS")
    decode()
    peak_mb = peak_growth_mb(before)
    calls, sent = dict(comm.STATS.calls), comm.STATS.bytes
    times = time_calls(decode, repeats, barrier)
    return dict(times=times, calls=calls, bytes=sent, peak_rss_mb=peak_mb, frames=frames)


def _rank_bench(runtime, config_name, repeats):
    from parallel.vae import decode_latents_parallel, parallelize_vae

    vae, latents = _build(config_name)
    parallelize_vae(vae, runtime)
    return _measure(lambda: decode_latents_parallel(vae, latents), repeats, barrier=runtime.barrier)


def _one_rank_bench(config_name, repeats):
    from k4flash.vae import decode_latents

    torch.set_num_threads(1)
    vae, latents = _build(config_name)
    return _measure(lambda: decode_latents(vae, latents), repeats)


def _calls(calls: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(calls.items())) or "0"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIG_NAMES, default="mid")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    add_output_args(parser)
    args = parser.parse_args(argv)

    rows, reference = [], None
    for ranks in args.ranks:
        # 1 rank in a fresh process too, so its RSS figure is comparable.
        per_rank = [in_fresh_process(_one_rank_bench, args.config, args.repeats)] if ranks == 1 else run_ranks(
            ranks, _rank_bench, args.config, args.repeats, timeout=1800, start_method="spawn")
        frames = per_rank[0].pop("frames")
        reference = frames if reference is None and ranks == 1 else reference
        # The decode ends when the slowest rank's rows reach rank 0.
        step_times = slowest_rank_times(r["times"] for r in per_rank)
        rows.append(dict(ranks=ranks, median_s=statistics.median(step_times), min_s=min(step_times),
                         calls=per_rank[0]["calls"], mb_sent_per_rank=max(r["bytes"] for r in per_rank) / 2**20,
                         peak_rss_mb_per_rank=max(r["peak_rss_mb"] for r in per_rank),
                         uint8_differing=None if reference is None else int((frames != reference).sum()),
                         frames_shape=list(frames.shape)))
    base = next((r["median_s"] for r in rows if r["ranks"] == 1), None)
    vae, latents = _build(args.config)
    for r in rows:
        r["speedup"] = base / r["median_s"] if base else None
        # The memory model's figure for one band (parallel/counting.py vae_decode_peak_bytes, on the meta device)
        r["predicted_peak_mb"] = vae_decode_peak_bytes(tuple(latents.shape[:3]), r["ranks"],
                                                       vae=vae.to("meta"), dtype=torch.float32) / 2**20
    frames, height, width = LATENT
    report = Report("vae_decode", config=args.config, latents=f"{frames}x{height}x{width}",
                    frames=rows[0]["frames_shape"], dtype="float32", threads_per_rank=1, repeats=args.repeats)
    report.table("Row-parallel VAE decode per number of ranks", [
        ("ranks", "ranks", None), ("median_s", "decode median s", ".3f"), ("speedup", "speed-up vs 1 rank", ".2f"),
        ("calls", "collectives / decode", _calls), ("mb_sent_per_rank", "MB sent / rank", ".2f"),
        ("peak_rss_mb_per_rank", "decode peak RSS MB / rank", ".1f"),
        ("predicted_peak_mb", "predicted peak MB / rank (meta count)", ".1f"),
        ("uint8_differing", "uint8 values differing from 1 rank", None),
    ], rows)
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
