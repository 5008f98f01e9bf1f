"""This process's memory as Linux reports it (/proc/self/status), and the peak-RSS mark the benchmarks reset so
that a peak is one phase's own."""
from pathlib import Path


def status_kib(field) -> int:
    """A /proc/self/status field in kB: VmRSS (resident now), VmHWM (peak resident), RssAnon (anonymous)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def status_mb(field) -> float:
    return status_kib(field) / 1024


def reset_peak_rss() -> None:
    """Set VmHWM back to VmRSS (clear_refs "5"): the next peak is what follows. Raises OSError on a kernel that
    does not let a process reset its mark."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_growth_mb(rss_before_mb) -> float:
    """How far the peak RSS rose above `rss_before_mb` (VmRSS read just after reset_peak_rss)."""
    return status_mb("VmHWM") - rss_before_mb
