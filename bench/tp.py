"""Every parallel plan of the DiT side by side: work per rank counted, forward timed, collectives and bytes.

    python -m bench.tp [--config mid|tiny] [--degrees 2 4] [--plans tp tp+sp ulysses ulysses*tp ulysses*tp+sp]
                       [--repeats 5] [--compile] [--device cpu|cuda] [--json F] [--md F]

One rank (a fresh process, no process group) is the baseline. For each degree, one world of
fresh processes runs every plan that the degree allows, one after another: each loads the
DiT from a safetensors checkpoint with parallel.load (each rank reads only its slice), counts
one forward, then times `--repeats` forwards after a warm-up.

Counted, deterministic (the same on any machine; timings on shared cores swing by ±30 %):
FLOPs (torch.utils.flop_counter) and the bytes that non-matmul, non-view ops read and write
(parallel.counting.RankWork over one forward), both the maximum over ranks, and their split
(one rank's count / this plan's); collectives and the bytes each rank hands to them
(parallel.comm.STATS). Timed: the median forward (the slowest rank of each repeat), its
speed-up over one rank measured in this run, and per-rank CPU seconds per forward.
CPU: gloo ranks with one intra-op thread each, float32. `--device cuda`: rank r on cuda:r
over NCCL, bf16 weights under bf16 autocast. `--compile` compiles the blocks after loading.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.configs import DIT_CONFIGS, autocast_for, dit_inputs
from bench.host_memory import peak_growth_mb, reset_peak_rss, status_mb
from bench.ranks import in_fresh_process
from bench.report import Report, add_output_args
from bench.timing import slowest_rank_times, synchronize
from k4flash.dit import DiffusionTransformer3D
from k4flash.tiny import fill_deterministic_
from parallel.spawn import run_ranks

CONFIG_NAMES = ("mid", "tiny")  # of bench.configs.DIT_CONFIGS: what CPU ranks run in seconds

# plan name → (ulysses, tp, sequence_parallel) at `degree` ranks; None where the degree does not allow it
PLANS = {
    "tp": lambda d: (1, d, False),
    "tp+sp": lambda d: (1, d, True),
    "ulysses": lambda d: (d, 1, False),
    "ulysses*tp": lambda d: (d // 2, 2, False) if d >= 4 else None,
    "ulysses*tp+sp": lambda d: (d // 2, 2, True) if d >= 4 else None,
}


def _start_peak_window(params):
    """Reset the kernel's peak-RSS mark (VmHWM) so the next peak is the loading's own; returns RSS now (MB).

    A meta-device build first pays the one-time lazy initialisation (~70 MB here), which
    is not loading.
    """
    with torch.device("meta"):
        DiffusionTransformer3D(**params)
    reset_peak_rss()
    return status_mb("VmRSS")


def _measure(config, load, repeats, device, compile_blocks, barrier=None):
    """Load (peak RSS growth), one counted forward, then `repeats` timed forwards (wall and CPU seconds)."""
    from parallel.rank_work import measure_rank_work

    before = _start_peak_window(config["params"])
    model = load()
    load_rss = peak_growth_mb(before)
    if compile_blocks:
        model.compile_blocks()
    inputs = dit_inputs(config, device, seed=0)
    autocast = autocast_for(device, _dtype(device))

    def forward():
        with autocast():
            model(*inputs)
        synchronize(device)

    with torch.no_grad():
        start = time.perf_counter()
        forward()  # warm-up (and the compile)
        first_s = time.perf_counter() - start
        work = measure_rank_work(model, inputs, bytes_per_element=_dtype(device).itemsize)
        times, cpu = [], []
        for _ in range(repeats):
            if barrier:
                barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            forward()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(work, times=times, cpu_s=statistics.median(cpu), first_s=first_s, param_bytes=param_bytes,
                load_rss_mb=load_rss)


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _rank_bench(runtime, config_name, checkpoint, repeats, compile_blocks, plans):
    """Every plan in `plans` ({name: (ulysses, tp, sp)}) on this rank, one after another."""
    from parallel.load import load_dit_sharded
    from parallel.runtime import model_group_meshes

    config, out = DIT_CONFIGS[config_name], {}
    for name, (ulysses, tp, sp) in plans.items():
        _, mesh = model_group_meshes(runtime.device.type, runtime.world_size, ulysses, tp)
        load = lambda: load_dit_sharded(config["params"], checkpoint, mesh, device=runtime.device,  # noqa: E731
                                        dtype=_dtype(runtime.device), sequence_parallel=sp)
        out[name] = _measure(config, load, repeats, runtime.device, compile_blocks, barrier=runtime.barrier)
    return out


def _one_rank_bench(config_name, checkpoint, repeats, device_type, compile_blocks):
    """The baseline: the plain model, no process group, one thread."""
    from k4flash.weights import load_dit

    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    config = DIT_CONFIGS[config_name]
    return _measure(config, lambda: load_dit(config["params"], checkpoint, device=device, dtype=_dtype(device)),
                    repeats, device, compile_blocks)


def _row(name, degree, per_rank, base=None):
    step_times = slowest_rank_times(r["times"] for r in per_rank)
    busiest = dict(flops=max(r["flops"] for r in per_rank), memory_bytes=max(r["memory_bytes"] for r in per_rank))
    row = dict(plan=name, ranks=degree, median_s=statistics.median(step_times), times_s=step_times,
               cpu_s=max(r["cpu_s"] for r in per_rank), first_call_s=max(r["first_s"] for r in per_rank),
               flops=busiest["flops"], memory_bytes=busiest["memory_bytes"], calls=per_rank[0]["calls"],
               bytes_per_rank=max(r["comm_bytes"] for r in per_rank),
               param_bytes_per_rank=max(r["param_bytes"] for r in per_rank),
               load_peak_rss_mb_per_rank=max(r["load_rss_mb"] for r in per_rank))
    base = base or row
    row.update(speedup=base["median_s"] / row["median_s"], flops_split=base["flops"] / row["flops"],
               bytes_split=base["memory_bytes"] / row["memory_bytes"],
               collectives=", ".join(f"{n} {k}" for k, n in sorted(row["calls"].items())) or "0")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIG_NAMES, default="mid")
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=list(PLANS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks on every rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.degrees):
        parser.error(f"--device cuda needs {max(args.degrees)} GPUs, {torch.cuda.device_count()} visible")

    config = DIT_CONFIGS[args.config]
    report = Report("tp", config=args.config, device=args.device,
                    dtype="bf16 autocast" if args.device == "cuda" else "float32",
                    backend="nccl" if args.device == "cuda" else "gloo, 1 thread per rank",
                    repeats=args.repeats, compile=args.compile)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        model = fill_deterministic_(DiffusionTransformer3D(**config["params"]), seed=0)
        checkpoint = Path(tmp) / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        del model
        # One rank in a fresh process too, so its RSS figure is comparable.
        base = _row("one rank", 1, [in_fresh_process(_one_rank_bench, args.config, str(checkpoint), args.repeats,
                                                     args.device, args.compile)])
        rows = [base]
        for degree in sorted(set(args.degrees) - {1}):
            plans = {name: PLANS[name](degree) for name in args.plans if PLANS[name](degree) is not None}
            per_rank = run_ranks(degree, _rank_bench, args.config, str(checkpoint), args.repeats, args.compile, plans,
                                 device=args.device, tp=degree, start_method="spawn")
            rows += [_row(name, degree, [r[name] for r in per_rank], base) for name in plans]
    report.table("DiT forward per plan: work per rank counted, time measured", [
        ("plan", "plan", None), ("ranks", "ranks", None),
        ("flops_split", "FLOPs split", ".2f"), ("bytes_split", "non-matmul bytes split", ".2f"),
        ("median_s", "forward median s", ".3f"), ("speedup", "wall speed-up", ".2f"),
        ("cpu_s", "CPU s / rank", ".3f"), ("collectives", "collectives / forward", None),
        ("bytes_per_rank", "MB sent / rank", lambda b: f"{b / 2**20:.2f}"),
        ("param_bytes_per_rank", "param MB / rank", lambda b: f"{b / 2**20:.1f}"),
        ("load_peak_rss_mb_per_rank", "load peak RSS MB / rank", ".1f")], rows)
    report.note("Splits: one rank's count / the busiest rank's count in this plan (FLOPs from FlopCounterMode, "
                "bytes read and written by every non-matmul, non-view op outside attention). Counts are exact and "
                "repeatable; the timings share this machine's cores.")
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
