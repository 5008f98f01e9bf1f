"""Section 5: peak memory per stage; its rows are StageMemory.rows, one per `stage` the other sections ran in."""
import contextlib

import torch

from bench.host_memory import reset_peak_rss, status_kib
from bench.timing import synchronize


class StageMemory:
    """Peak memory per stage. CUDA: max_memory_allocated after a reset at the stage's start (this process's
    tensors, GiB). CPU: the process's peak RSS (VmHWM) after resetting the kernel's mark (clear_refs)."""

    def __init__(self, device):
        self.device = device
        self.rows = []

    def _now_gib(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        return status_kib("VmRSS") / 2**20

    @contextlib.contextmanager
    def stage(self, name):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # not every kernel lets a process reset its mark
                reset_peak_rss()
        start = self._now_gib()
        yield
        synchronize(self.device)
        # CPU: the kernel updates VmHWM from per-thread RSS counters in batches, so it can trail VmRSS by
        # a few hundred kB; the peak is at least where the stage started and ended.
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
                else max(status_kib("VmHWM") / 2**20, start, self._now_gib()))
        self.rows.append(dict(stage=name, start_gib=start, peak_gib=peak, growth_gib=peak - start))
