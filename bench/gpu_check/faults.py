"""Section 9: faults injected into rank 1 of a launched job (tests/fault_worker.py, run as a script): how it
exits, how long after the fault, and rank 0's one error line."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check.run import log

ROOT = Path(__file__).resolve().parents[2]
FAULT_WORKER = ROOT / "tests" / "fault_worker.py"  # a script the launcher runs, not a module bench imports
FAULTS = [  # K4FLASH_TEST_FAULT, what rank 0's one error line must say (tests/test_faults.py)
    ("kill:1:2", r"rank 1 died or froze"),
    ("hang:1:2", r"rank 1 is hung"),
    ("stop:1:2", r"rank 1 died or froze"),  # SIGSTOP: alive to the launcher, frozen to its peers
    ("raise:1:3", r"rank 1 failed during prompt 0: MemoryError"),
]


def run_fault(fault, world, device_type, timeout_s, cap_s, cache, workdir):
    """One launch with a fault injected into rank 1: (exit status, seconds fault → exit, error lines, capped)."""
    command = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", str(world),
               str(FAULT_WORKER), "model=tiny", "time_length=0", "width=512", "height=512",
               "progress=false", f"device={device_type}", f"parallel.timeout_s={timeout_s:g}", "save_path=out/v.mp4"]
    env = dict(os.environ, K4FLASH_CACHE=str(cache), HF_HUB_OFFLINE="1", K4FLASH_TEST_FAULT=fault,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # Its own session, so that a run past the cap can be stopped with every rank it started.
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=cap_s)
        capped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        capped = True
    exited = time.time()
    fired = re.findall(r"fault_worker: .* at t=([0-9.]+)", stderr)
    return dict(exit_status=proc.returncode, capped=capped,
                fault_to_exit_s=exited - float(fired[0]) if fired else None,
                errors=[line for line in stderr.splitlines() if line.startswith("error:")],
                tail=None if fired else stderr[-2000:])


def fault_rows(world, device_type, timeout_s, cap_s):
    from k4flash.tiny import TINY_FORMAT_VERSION, ensure_tiny_weights

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_faults_") as tmp:
        cache = Path(tmp) / "cache"
        ensure_tiny_weights(cache / f"tiny-v{TINY_FORMAT_VERSION}")  # where model=tiny looks under K4FLASH_CACHE
        for fault, culprit in FAULTS:
            workdir = Path(tmp) / fault.replace(":", "_")
            workdir.mkdir()
            log(f"9. fault {fault} on {world} ranks")
            result = run_fault(fault, world, device_type, timeout_s, cap_s, cache, workdir)
            errors = result.pop("errors")
            left = sorted(p.name for p in (workdir / "out").rglob("*")) if (workdir / "out").exists() else []
            rows.append(dict(fault=fault, **result, error_line=errors[0] if errors else None, error_lines=len(errors),
                             names_culprit=len(errors) == 1 and bool(re.search(culprit, errors[0])),
                             outputs_left=len(left)))
    return rows
