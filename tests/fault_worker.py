"""run_inference_distil.py with a fault injected into one rank, for tests/test_faults.py.

K4FLASH_TEST_FAULT="<action>:<rank>:<step>[:<video>]" makes that rank, just before its
DiT call at that denoising step (1-based) of its <video>-th video (default 1):
  kill       SIGKILL itself
  hang       sleep forever in the main thread (the heartbeat thread runs on: a hang, not a death)
  raise      raise MemoryError
  interrupt  send SIGINT to its whole process group, as Ctrl-C in a terminal does
  nan        return a velocity of NaN (a numerically broken model)
The injection patches the pipeline's sampler from outside; the product code has no hook.
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # like run_inference_distil.py, whose folder is the checkout
import k4flash.pipeline  # noqa: E402
import torch  # noqa: E402

ENTRY = ROOT / "run_inference_distil.py"
action, fault_rank, fault_step, *fault_video = os.environ["K4FLASH_TEST_FAULT"].split(":")
fault_video = int(fault_video[0]) if fault_video else 1
real_sample = k4flash.pipeline.sample
videos = []


def faulty_sample(velocity_fn, *args, **kwargs):
    steps = []
    videos.append(1)

    def velocity(latent, timestep):
        steps.append(timestep)
        if (int(os.environ.get("RANK", "0")) == int(fault_rank) and len(steps) == int(fault_step)
                and len(videos) == fault_video):
            print(f"fault_worker: rank {fault_rank} {action} at step {fault_step} at t={time.time():.3f}",
                  file=sys.stderr, flush=True)
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
        return velocity_fn(latent, timestep)

    return real_sample(velocity, *args, **kwargs)


k4flash.pipeline.sample = faulty_sample
sys.argv[0] = str(ENTRY)
runpy.run_path(str(ENTRY), run_name="__main__")
