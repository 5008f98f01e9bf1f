"""A finished run exits at once: nothing between its last output and the end of the process.

Where the time went (a 2-rank CPU run ended 1.5-2.5 s after its last line, more on a busy
machine; one process 1.2-1.4 s): Python's finalization runs several full garbage
collections over the ~0.5 million objects torch, transformers and diffusers leave alive,
in every rank at once. `parallel.runtime.init_runtime` registers an atexit hook that
freezes the heap, so those collections have nothing to scan. These tests check the
mechanism by what the interpreter reports (the frozen-object count at the very end of the
exit), not by wall time. The heartbeat thread was suspected too: it is not the cause, and
the tests below keep it that way (stop() joins it, and never waits out a store timeout).
"""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from parallel import health as health_module
from parallel.health import RankHealth

ROOT = Path(__file__).resolve().parents[1]

# Registered before anything else, so that it runs last at exit, after every other atexit handler
# (atexit is last in, first out): what the interpreter's final collections will find frozen.
REPORT_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print(f"frozen at exit: {gc.get_freeze_count()}", flush=True))
"""


def frozen_at_exit(result) -> int:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("frozen at exit: ")]
    assert lines, result.stdout[-2000:]
    return int(lines[-1].rsplit(" ", 1)[1])


def run_python(code: str, env=None, timeout=120):
    env = {**os.environ, **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # one plain process, whatever launched pytest
    return subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + REPORT_AT_EXIT + code], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("fast_exit", [True, False])
def test_a_rank_exits_with_its_heap_frozen(fast_exit):
    result = run_python(f"from parallel.runtime import init_runtime\ninit_runtime('cpu', fast_exit={fast_exit})\n")
    frozen = frozen_at_exit(result)
    if fast_exit:
        assert frozen > 50_000  # torch alone leaves far more objects than this alive
    else:
        assert frozen == 0  # the library entry point leaves the caller's exit alone


@pytest.mark.slow
def test_a_cli_run_exits_with_its_heap_frozen(tmp_path, tiny_cache):
    """The command the user runs: after its last output, the exit collections have nothing to scan."""
    overrides = ["model=tiny", "time_length=0", "width=512", "height=512", "progress=false",
                 f"save_path={tmp_path / 'x.mp4'}", "hydra.run.dir=" + str(tmp_path / "hydra")]
    code = ("import runpy\n"
            f"sys.argv = [{str(ROOT / 'run_inference_distil.py')!r}, *{overrides!r}]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = run_python(code, env={"K4FLASH_CACHE": str(tiny_cache), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert (tmp_path / "x.png").exists(), result.stderr[-3000:]
    assert frozen_at_exit(result) > 100_000


@pytest.fixture
def store(monkeypatch):
    """A key-value store like torchrun's agent store, at MASTER_ADDR:MASTER_PORT."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"exit-test-{os.getpid()}")
    return server


def test_stop_ends_the_heartbeat_thread(store):
    health = RankHealth.start(0, 2, interval_s=0.05)
    try:  # a failed check must not leave a heartbeat thread (and the signal pipe) behind in the test process
        assert health._thread is not None
        deadline = time.monotonic() + 30
        while health._records.beats(0) in (None, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health._records.beats(0) >= 1
    finally:
        health.stop()
    assert not health._thread.is_alive()  # joined: no store call of it outlives stop()
    beats = health._records.beats(0)
    time.sleep(0.25)  # five heartbeat intervals
    assert health._records.beats(0) == beats


def test_stop_never_waits_out_a_stuck_store_call(store):
    """A heartbeat thread inside a store call whose host is gone would block for STORE_TIMEOUT_S:
    stop() leaves it behind (a daemon) rather than hold the exit for that long."""
    health = RankHealth.start(0, 2, interval_s=0.05)
    health.stop()
    release = threading.Event()
    health._thread = threading.Thread(target=release.wait, args=(health_module.STORE_TIMEOUT_S,), daemon=True)
    health._thread.start()
    try:
        clock = time.monotonic()
        health.stop()
        assert time.monotonic() - clock < health_module.STORE_TIMEOUT_S / 2
        assert health_module.STOP_TIMEOUT_S < health_module.STORE_TIMEOUT_S / 2
    finally:
        release.set()
