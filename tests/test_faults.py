"""Faults mid-run: a rank killed, hung, failing or interrupted; Ctrl-C; a crash in the middle of a batch.

Each run injects its fault from outside the product code (tests/fault_worker.py) and
checks what a user sees: every rank exits non-zero within a bound after the fault,
rank 0's one `error:` line names the rank at fault, and no output file (or temporary
file) is left behind.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spawn import free_port
from test_cli import ENTRY

WORKER = Path(__file__).with_name("fault_worker.py")
TIMEOUT_S = 8  # parallel.timeout_s: how long a collective waits for a hung rank
# After the fault: the collective timeout, rank 0's 2.5 s diagnosis, and torchrun's teardown;
# generous because CI machines are slow and shared.
BOUND_S = TIMEOUT_S + 30
IMAGE = ["model=tiny", "time_length=0", "width=512", "height=512", "progress=false"]


def _env(tiny_cache, fault=None):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("K4FLASH_TEST_FAULT", None)
    if fault:
        env["K4FLASH_TEST_FAULT"] = fault
    return env


def run_with_fault(cwd, tiny_cache, fault, overrides, world=None):
    """Run the worker (under torchrun when `world` is given); returns (result, seconds from fault to exit)."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(free_port())]
    command = [sys.executable, *(launcher if world else []), str(WORKER), *overrides]
    # Its own session: an injected Ctrl-C goes to the run's process group, not to pytest. SIGINT back to
    # its default: a shell running CI in the background hands its children SIGINT ignored.
    result = subprocess.run(command, cwd=cwd, env=_env(tiny_cache, fault), capture_output=True, text=True,
                            timeout=300, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    exited = time.time()
    faults = re.findall(r"fault_worker: .* at t=([0-9.]+)", result.stderr)
    assert faults, f"the fault never fired:\n{result.stderr[-3000:]}"
    return result, exited - float(faults[0])


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def leftovers(directory: Path):
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


@pytest.mark.parametrize("fault, world, culprit", [
    ("kill:1:2", 4, r"rank 1 died or froze during prompt 0"),
    ("hang:1:2", 2, r"rank 1 is hung during prompt 0"),
    ("raise:1:3", 2, r"rank 1 failed during prompt 0: MemoryError: injected: out of memory"),
    ("interrupt:1:2", 2, r"rank 1 was stopped during prompt 0|interrupted"),
])
def test_a_failing_rank_stops_every_rank_and_is_named(tmp_path, tiny_cache, fault, world, culprit):
    result, after_fault_s = run_with_fault(tmp_path, tiny_cache, fault,
                                           [*IMAGE, "save_path=out/v.mp4", f"parallel.timeout_s={TIMEOUT_S}"],
                                           world=world)
    assert result.returncode != 0
    assert after_fault_s < BOUND_S, f"{after_fault_s:.1f} s from the fault to the last exit"
    errors = error_lines(result)
    assert len(errors) == 1 and re.search(culprit, errors[0]), result.stderr[-3000:]
    named = re.findall(r"rank (\d+) (?:died|failed|is hung|was stopped)", errors[0])
    assert named == ["1"] or (fault.startswith("interrupt") and named == []), errors[0]  # no bystander is blamed
    assert "Traceback" not in result.stderr.split("fault_worker:")[0]  # nothing went wrong before the fault
    assert leftovers(tmp_path / "out") == []  # no video, no sidecar, no temporary file


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path, tiny_cache):
    result, after_fault_s = run_with_fault(tmp_path, tiny_cache, "interrupt:0:2", [*IMAGE, "save_path=out/v.mp4"])
    assert result.returncode == 130, result.stderr[-3000:]
    assert error_lines(result) == ["error: interrupted; finished outputs are kept, re-run the same command to resume"]
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_non_finite_latents_fail_the_prompt_naming_the_step(tmp_path, tiny_cache):
    result, _ = run_with_fault(tmp_path, tiny_cache, "nan:0:2", [*IMAGE, "save_path=out/v.mp4"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_lines(result) == ["error: latents are not finite after denoising step 2 of 4 (timestep 749): the DiT "
                                   "produced NaN/inf (check the weights and dtype)"]
    assert leftovers(tmp_path / "out") == []


def test_a_batch_killed_mid_video_resumes_without_loss_or_redo(tmp_path, tiny_cache):
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    batch = [*IMAGE, "prompts_file=prompts.txt", "output_dir=out"]
    killed, _ = run_with_fault(tmp_path, tiny_cache, "kill:0:2:2", batch)  # SIGKILL during the 2nd video
    assert killed.returncode == -signal.SIGKILL
    assert leftovers(tmp_path / "out") == ["00000-a-red-square.json", "00000-a-red-square.png"]
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    resumed = subprocess.run([sys.executable, str(ENTRY), *batch], cwd=tmp_path, env=_env(tiny_cache),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 3 prompts already done" in resumed.stdout + resumed.stderr
    assert leftovers(tmp_path / "out") == sorted(f"{stem}.{ext}" for stem in
                                                 ("00000-a-red-square", "00001-a-blue-circle", "00002-a-green-triangle")
                                                 for ext in ("json", "png"))
    for name, mtime in first.items():  # the finished video was not redone
        assert (tmp_path / "out" / name).stat().st_mtime_ns == mtime
