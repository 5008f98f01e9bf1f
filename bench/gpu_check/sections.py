"""The sections in the order the run needs them, each in its own stage of section 5, a section that raises
recorded and passed over."""
import traceback

import torch

from bench.configs import dit_inputs
from bench.gpu_check.backends import check_backends
from bench.gpu_check.end_to_end import end_to_end_rows
from bench.gpu_check.faults import fault_rows
from bench.gpu_check.model import build_dit
from bench.gpu_check.run import log
from bench.gpu_check.sampler import profile_sampler
from bench.gpu_check.steps import time_steps
from bench.gpu_check.tp import tensor_parallel_rows
from bench.gpu_check.vae import time_vae_decode
from k4flash.published import NUM_STEPS


class Sections(dict):
    """The figures by section; `run` keeps going past a section that raises, so that one failure on a first
    GPU run does not cost every other figure: its traceback goes to stderr, its error line to `errors`."""

    def __init__(self):
        super().__init__()
        self.errors = {}

    def run(self, key, name, fn, *args):
        try:
            self[key] = fn(*args)
        except Exception as err:  # noqa: BLE001 (reported as a failed check; KeyboardInterrupt still stops)
            traceback.print_exc()
            lines = str(err).strip().splitlines()
            self.errors[name] = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
        return self.get(key)


def one_device_sections(run, args, memory) -> Sections:
    """Sections 1-7 on one device, in the order that needs each model state once: fp32 round trip, eager
    (the pipeline's default), the sampler on the eager model, then the compile, which cannot be undone."""
    device, dtype, config = run.device, run.dtype, run.config
    flops = run.flops["total"]
    log(f"1. building the {run.config_name} DiT on {run.card}")
    sections = Sections()
    with memory.stage("1. build the DiT (random weights)"):
        model, sections["model"] = build_dit(run)  # without it nothing else runs: not guarded
    inputs = dit_inputs(config, device, dtype)

    log("2. SDPA backends against math")
    with memory.stage("2. fp32 default and math, bf16 default (reduced geometry)"):
        sections.run("backends", "2", check_backends, model, config, device, dtype)
    log("3. step latency, eager")
    with memory.stage("3. DiT step, eager"):
        sections.run("eager", "3 eager", time_steps, model, inputs, device, dtype, args.warmup, args.repeats, flops,
                     run.peak_flops, "eager")
    log("6. sampler under the profiler, then under sync debug mode")
    with memory.stage(f"6. sampler, {NUM_STEPS} steps (eager)"):
        sections.run("sampler", "6", profile_sampler, model, config, device, dtype)
    if not args.no_compile:
        log(f"3. step latency, compiled ({run.compile_backend})")
        with memory.stage("3. DiT step, compiled"):
            sections.run("compiled", "3 compiled", lambda: time_steps(
                model.compile_blocks(backend=run.compile_backend), inputs, device, dtype, args.warmup, args.repeats,
                flops, run.peak_flops, f"torch.compile ({run.compile_backend})"))
    sections["steps"] = [sections.pop(key) for key in ("eager", "compiled") if key in sections]
    log("4. VAE decode")
    with memory.stage("4. VAE decode (DiT resident, as in the pipeline)"):
        sections.run("vae", "4", time_vae_decode, config, device, dtype, 1, args.vae_repeats)
    if sections["steps"] and sections.get("vae"):
        sections["end_to_end"] = end_to_end_rows(sections["steps"], sections.get("sampler"), sections["vae"])
    return sections


def multi_rank_sections(run, args, sections: Sections, report) -> None:
    """Sections 8 and 9 on run.world ranks, added to `sections`; a note in `report` where they are skipped."""
    if run.device.type == "cuda":
        torch.cuda.empty_cache()  # the DiT is gone: the ranks of 8 and 9 need this GPU too
    if run.world <= 1:
        report.note("8-9. tensor parallel and NCCL faults skipped: one rank (--gpus N, N > 1, runs them)")
        return
    log(f"8. tensor parallel, tp={run.world}")
    sections.run("tp", "8", tensor_parallel_rows, run.world, run.config_name, run.device.type, args.warmup,
                 args.repeats)
    if args.no_faults:
        report.note("9. faults skipped (--no-faults)")
    else:
        sections.run("faults", "9", fault_rows, run.world, run.device.type, args.fault_timeout_s, args.fault_cap_s)
