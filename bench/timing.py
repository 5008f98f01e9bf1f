"""How the benchmarks time a call: one timer per device, repeated calls, the slowest rank per repeat."""
import statistics
import time

import torch


def synchronize(device):
    """Wait for `device`'s queued work (a no-op on the CPU, where every call has finished on return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """CUDA events on a GPU (no host sync inside the timed region), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


CPU_TIMER = Timer(torch.device("cpu"))


def time_calls(fn, repeats: int, barrier=None, timer=CPU_TIMER) -> list:
    """Seconds for each of `repeats` calls of fn(); `barrier` (multi-rank) starts every rank's call together."""
    times = []
    for _ in range(repeats):
        if barrier:
            barrier()
        times.append(timer(fn))
    return times


def timed(fn, repeats):
    """(fn()'s last output, seconds of each of `repeats` calls)."""
    last = [None]

    def call():
        last[0] = fn()
    times = time_calls(call, repeats)
    return last[0], times


def measure(model, inputs, timer, warmup, repeats, autocast):
    """model(*inputs) under autocast(): the first call on its own, then `repeats` timed calls after `warmup`
    calls in all (the first included), and whether a last forward's output is finite."""
    def forward():
        with autocast():
            return model(*inputs)

    with torch.no_grad():
        first_s = timer(forward)  # the first call: RoPE tables, cuBLAS/cuDNN autotune, or the compile
        for _ in range(max(warmup - 1, 0)):
            timer(forward)
        times = time_calls(forward, repeats, timer=timer)
        out = forward()
    return dict(first_call_s=first_s, times_s=times, median_s=statistics.median(times), min_s=min(times),
                output_finite=bool(torch.isfinite(out).all()))


def slowest_rank_times(per_rank_times) -> list:
    """A parallel step is as slow as its slowest rank: per repeat, the max over the ranks' times."""
    return [max(times) for times in zip(*per_rank_times)]
