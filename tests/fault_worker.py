"""run_inference_distil.py with a fault injected into one rank, for tests/test_faults.py.

K4FLASH_TEST_FAULT="<action>:<rank>:<step>[:<video>]" makes that rank, just before its
DiT call at that denoising step (1-based) of its <video>-th video (default 1):
  kill       SIGKILL itself
  hang       sleep forever in the main thread (the heartbeat thread runs on: a hang, not a death)
  raise      raise MemoryError
  interrupt  send SIGINT to its whole process group, as Ctrl-C in a terminal does
  nan        return a velocity of NaN (a numerically broken model)
  stop       SIGSTOP itself (frozen: alive to the launcher, but its threads never run again)
  block      block in native code, like the other ranks with K4FLASH_TEST_NATIVE_BLOCK (below)
K4FLASH_TEST_NATIVE_BLOCK="<rank>[,<rank>...]" makes those ranks, from the same step on, block for ever
inside their next collective, in a C call that no signal interrupts: what the host thread of an NCCL rank
does at a sync whose peer is gone (gloo would raise instead). Only their heartbeat threads still run.
The injection patches the pipeline's sampler from outside; the product code has no hook.
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import k4flash.pipeline
import torch

ROOT = Path(__file__).resolve().parents[1]

ENTRY = ROOT / "run_inference_distil.py"
RANK = int(os.environ.get("RANK", "0"))
action, fault_rank, fault_step, *fault_video = os.environ["K4FLASH_TEST_FAULT"].split(":")
native_block_ranks = {int(r) for r in os.environ.get("K4FLASH_TEST_NATIVE_BLOCK", "").split(",") if r}
armed = []  # set once this rank reached the fault step: its collectives block from then on


def say(line: str) -> None:
    """One line to stderr in one write: both ranks report at the same instant, and print() under PYTHONUNBUFFERED
    writes the text and its newline apart, so two ranks' lines could merge into one."""
    os.write(2, (line + "\n").encode())


def block_in_native_code():
    """Wait for ever in C: a default mutex locked twice by its owner. pthread_mutex_lock resumes its wait
    after a signal, so Python's handlers never get to run (ctypes releases the GIL meanwhile)."""
    import ctypes
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # PTHREAD_MUTEX_INITIALIZER: all zeros (glibc)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


def blocking(collective):
    def call(*args, **kwargs):
        if armed:
            say(f"fault_worker: rank {RANK} blocks in native code at t={time.time():.3f} pid={os.getpid()}")
            block_in_native_code()
        return collective(*args, **kwargs)
    return call


if RANK in native_block_ranks:
    import torch.distributed as dist
    for name in ("all_reduce", "all_gather", "broadcast", "gather"):
        setattr(dist, name, blocking(getattr(dist, name)))
fault_video = int(fault_video[0]) if fault_video else 1
real_sample = k4flash.pipeline.sample
videos = []


def faulty_sample(velocity_fn, *args, **kwargs):
    steps = []
    videos.append(1)

    def velocity(latent, timestep):
        steps.append(timestep)
        if RANK in native_block_ranks and len(steps) == int(fault_step) and len(videos) == fault_video:
            armed.append(True)
        if (RANK == int(fault_rank) and len(steps) == int(fault_step)
                and len(videos) == fault_video):
            say(f"fault_worker: rank {fault_rank} {action} at step {fault_step} at t={time.time():.3f} "
                f"pid={os.getpid()}")
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "hang":
                while True:
                    time.sleep(60)
            elif action == "raise":
                raise MemoryError("injected: out of memory")
            elif action == "interrupt":
                os.killpg(os.getpgid(0), signal.SIGINT)
            elif action == "nan":
                return torch.full_like(velocity_fn(latent, timestep), float("nan"))
            elif action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif action == "block":
                block_in_native_code()
        return velocity_fn(latent, timestep)

    return real_sample(velocity, *args, **kwargs)


k4flash.pipeline.sample = faulty_sample
sys.argv[0] = str(ENTRY)
runpy.run_path(str(ENTRY), run_name="__main__")
