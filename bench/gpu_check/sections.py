"""The sections of the check as units that each run in a process of their own (bench/gpu_check/child.py).

A unit builds what it needs (the random DiT is rebuilt by each unit that uses it: seconds on a GPU), so a sticky
CUDA error, an out-of-memory kill or a crash in native code ends that unit alone. What a unit needs beyond torch is
named, so that a node without it skips the unit with a reason instead of losing the run. Estimated seconds include
the process's start (imports, CUDA context); the command skips a unit whose estimate does not fit `--budget-s`.
"""
import importlib.util
import traceback
from dataclasses import dataclass

from bench.gpu_check.run import log
from k4flash.published import NUM_STEPS


class Figures(dict):
    """The figures by report key; `guard` keeps going past a part that raises, so that one failure costs only its
    own rows: its traceback goes to stderr, its error line to `errors` (section label → line)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.errors = {}

    def guard(self, key, label, fn, *args):
        try:
            self[key] = fn(*args)
        except Exception as err:  # noqa: BLE001 (reported as a failed check; KeyboardInterrupt still stops)
            traceback.print_exc()
            self.errors[label] = error_line(err)
        return self.get(key)


def error_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _build(run, memory, unit):
    from bench.gpu_check.model import build_dit
    with memory.stage(f"{unit}: build the DiT (random weights)"):
        return build_dit(run)


def run_dit(run, args, memory, figures):
    """1 and 3: the DiT at the run's geometry, then one step eager and (unless --no-compile) compiled."""
    from bench.configs import dit_inputs
    from bench.gpu_check.steps import time_steps

    log(f"1. building the {run.config_name} DiT on {run.card}")
    model, figures["model"] = _build(run, memory, "1")
    inputs = dit_inputs(run.config, run.device, run.dtype)
    flops = run.flops["total"]
    steps = []
    log("3. step latency, eager")
    with memory.stage("3. DiT step, eager"):
        steps.append(figures.guard("eager", "3 eager", time_steps, model, inputs, run.device, run.dtype, args.warmup,
                                   args.repeats, flops, run.peak_flops, "eager"))
    if not args.no_compile:
        log(f"3. step latency, compiled ({run.compile_backend})")
        with memory.stage("3. DiT step, compiled"):
            steps.append(figures.guard("compiled", "3 compiled", lambda: time_steps(
                model.compile_blocks(backend=run.compile_backend), inputs, run.device, run.dtype, args.warmup,
                args.repeats, flops, run.peak_flops, f"torch.compile ({run.compile_backend})")))
    figures.pop("eager", None), figures.pop("compiled", None)
    figures["steps"] = [row for row in steps if row]


def run_backends(run, args, memory, figures):
    """2: the default SDPA backends and bf16 against the math kernel in fp32, at a reduced geometry; then each
    kernel alone, timed at the run's geometry."""
    from bench.gpu_check.backends import check_backends
    model, _ = _build(run, memory, "2")
    log("2. SDPA backends against math")
    with memory.stage("2. fp32 default and math, bf16 default (reduced geometry)"):
        figures.guard("backends", "2", check_backends, model, run.config, run.device, run.dtype)
    del model
    from bench.gpu_check.sdpa import kernel_rows
    log("2. each SDPA kernel alone: timed at the run's geometry, checked against math")
    with memory.stage("2. SDPA kernels alone (one attention)"):
        figures.guard("sdpa", "2 kernels", kernel_rows, run.config, run.device, run.dtype, args.warmup, args.repeats)


def run_sampler(run, args, memory, figures):
    """6: the sampler driving the eager DiT, under the profiler and then under sync debug mode."""
    from bench.gpu_check.sampler import profile_sampler
    model, _ = _build(run, memory, "6")
    log("6. sampler under the profiler, then under sync debug mode")
    with memory.stage(f"6. sampler, {NUM_STEPS} steps (eager)"):
        figures.guard("sampler", "6", profile_sampler, model, run.config, run.device, run.dtype)


def run_vae(run, args, memory, figures):
    """4: the VAE decode of the run's latent."""
    from bench.gpu_check.vae import time_vae_decode
    log("4. VAE decode")
    with memory.stage("4. VAE decode"):
        figures.guard("vae", "4", time_vae_decode, run.config, run.device, run.dtype, 1, args.vae_repeats)


def run_tp(run, args, memory, figures):
    """8: tp = world against tp = 1 on world ranks."""
    from bench.gpu_check.tp import tensor_parallel_rows
    log(f"8. tensor parallel, tp={run.world}")
    figures.guard("tp", "8", tensor_parallel_rows, run.world, run.config_name, run.device.type, args.warmup,
                  args.repeats)


def run_plans(run, args, memory, figures):
    """11: sequence-parallel TP, Ulysses (and Ulysses x TP) and the row-split VAE decode against one rank."""
    from bench.gpu_check.plans import plan_rows
    figures.guard("plans", "11", plan_rows, run.world, run.config_name, run.device.type, args.warmup, args.repeats,
                  args.vae_repeats)


def run_faults(run, args, memory, figures):
    """9: faults injected into rank 1 of a launched tiny job."""
    from bench.gpu_check.faults import fault_rows
    figures.guard("faults", "9", fault_rows, run.world, run.device.type, args.fault_timeout_s, args.fault_cap_s)


def run_pipeline(run, args, memory, figures):
    """10: one video end to end, per text_encoder.offload mode."""
    from bench.gpu_check.pipeline import pipeline_rows
    with memory.stage("10. pipeline end to end, each text-encoder offload"):
        figures.guard("pipeline", "10", pipeline_rows, run)


def run_fp8(run, args, memory, figures):
    """12: the FP8 DiT against the reference one on the same weights, eager and (unless --no-compile) compiled."""
    from bench.gpu_check.fp8 import fp8_rows
    figures.guard("fp8", "12", fp8_rows, run, args, memory, BY_NAME["fp8"].compile_s.get(run.device.type, 0))


@dataclass(frozen=True)
class Section:
    name: str  # as --sections names it
    numbers: str  # the report's sections it fills
    what: str
    needs: tuple  # top-level modules it imports beyond torch and k4flash's own needs
    estimate_s: dict  # device type → seconds, its process's start included
    run: callable
    ranks: bool = False  # runs on run.world ranks (skipped with one)
    compile_s: dict = None  # device type → the seconds of estimate_s that --no-compile saves

    def estimate(self, device_type: str, compiled: bool = True) -> float:
        return self.estimate_s[device_type] - (0 if compiled else (self.compile_s or {}).get(device_type, 0))


# Estimates for the published DiT on one H100/H200 (bf16) and for --smoke (tiny, fp32) on a 2-core CPU. The GPU
# ones are reasoned, not yet measured: CUDA context and imports ~15 s, a random 5.5 B DiT ~15 s, inductor's
# compile of the blocks ~90 s, the 12 s VAE decode ~10 s a run, random T5-XXL ~10 s; the pipeline section builds
# its three models once per text-encoder offload mode; the fault runs each start a 2-rank job (~30 s). fp8: start
# 15 s, build 15 s, quantize ~5 s, 2 x 8 eager forwards of ~1 s (575 TFLOP a step), the counting forward ~2 s:
# ~55 s eager, 70 with slack; compiled adds a rebuild (15 s), two inductor compiles (2 x 90 s) and 2 x 8 compiled
# forwards (~15 s): 210 s.
SECTIONS = (
    Section("dit", "1, 3", "the DiT built, one step eager and compiled", (), dict(cuda=150, cpu=40), run_dit,
            compile_s=dict(cuda=90, cpu=10)),
    Section("backends", "2", "SDPA backends and bf16 against fp32 math", (), dict(cuda=60, cpu=15), run_backends),
    Section("sampler", "6", "host syncs of the sampler", ("diffusers",), dict(cuda=60, cpu=20), run_sampler),
    Section("vae", "4", "the VAE decode of the run's video", ("diffusers",), dict(cuda=60, cpu=20), run_vae),
    Section("pipeline", "10", "one video end to end per text_encoder.offload (T5, DiT, VAE, writers)", ("diffusers",),
            dict(cuda=240, cpu=45), run_pipeline),
    Section("fp8", "12", "the FP8 DiT against bf16 on the same weights: step, error, memory, _scaled_mm", (),
            dict(cuda=280, cpu=20), run_fp8, compile_s=dict(cuda=210, cpu=5)),
    Section("tp", "8", "tensor parallel parity and speed-up", (), dict(cuda=90, cpu=40), run_tp, ranks=True),
    Section("plans", "11", "sequence-parallel TP, Ulysses and the row-split VAE against one rank", ("diffusers",),
            dict(cuda=150, cpu=60), run_plans, ranks=True),
    Section("faults", "9", "faults injected into a launched job", ("hydra", "omegaconf", "diffusers"),
            dict(cuda=200, cpu=120), run_faults, ranks=True),
)
BY_NAME = {section.name: section for section in SECTIONS}


def missing_modules(section) -> list:
    return [name for name in section.needs if importlib.util.find_spec(name) is None]
