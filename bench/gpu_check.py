"""The GPU acceptance check: one command measures and checks, on the day a GPU is at hand, what the CPU suite cannot.

    python -m bench.gpu_check [--out DIR] [--json F] [--md F]   # needs CUDA; sized for < 8 min on one H100
    python -m bench.gpu_check --gpus 8 --out DIR                # + tensor parallel and NCCL faults on 8 GPUs
    python -m bench.gpu_check --smoke [--json F] [--md F]       # the same code paths on the CPU (tiny, fp32; CI)
    python -m bench.gpu_check --smoke --gpus 2 --fault-timeout-s 8   # + sections 8 and 9 on 2 gloo ranks (~1 min)

Options: --no-compile (skip the compiled step), --no-faults (skip section 9), --gpus 1 (skip 8 and 9),
--repeats / --warmup / --vae-repeats, --fault-timeout-s (parallel.timeout_s of the fault runs),
--compile-backend (default inductor; aot_eager with --smoke, where inductor's C++ compile costs 5-30 s).

On one GPU (cuda:0), with random weights (no checkpoint needed):
  1. the published DiT (5.5 B parameters; bench.gpu_dit.build_random_dit, bf16, built on the GPU) at the
     published geometry: 12 s at 672x384 → latent 25 x 48 x 84 → 25,200 visual + 224 text tokens;
  2. SDPA backends: the model's default (dit_math.DEFAULT_SDPA_BACKENDS) against the math kernel, one forward
     in fp32 (TF32 off) at a reduced geometry (3 latent frames: math attention materialises the S x S scores,
     S² · heads · 4 B = 1.9 GiB there, 116 GiB at the full size), and bf16 autocast with the default backends
     against the same fp32 math forward: the fidelity bound of bf16. Which kernel the default picks is probed;
  3. step latency (one DiT forward = one denoising step), eager and compile_blocks'd: CUDA events, median of
     --repeats after --warmup, achieved TFLOP/s from k4flash.cost.dit_flops;
  4. the VAE decode of 12 s at 672x384 (AutoencoderKLCogVideoX() defaults = the published config, built on
     meta, materialised on the GPU in bf16, random weights) through k4flash.vae.decode_latents: 2 latent
     frames per chunk, uint8 frames on the host, as the pipeline decodes;
  5. peak GPU memory per stage (max_memory_allocated after a reset at the stage's start; the DiT stays
     resident through every stage, as in the pipeline);
  6. the sampler (k4flash.sampler.sample: all noise drawn up front, one pinned copy) driving the DiT as the
     pipeline does, under torch.profiler with CUDA activity: host syncs (cuda/cu Stream/Device/Event/Ctx
     Synchronize and blocking Memcpy calls) before, inside and after the step loop, told apart by markers
     in the velocity call and in on_step; then once more, timed, under torch.cuda.set_sync_debug_mode("warn"),
     whose warnings count the same syncs without the profiler. Expected: none in the loop, one after it
     (the finite check's copy of the per-step flags);
  7. an end-to-end estimate: T5-XXL from the cost model + 4 measured steps + the measured decode, against
     the seed's 11 s on one H100 (cost.SEED_CLAIM_S).
On N GPUs (--gpus N, default: every visible GPU when there are several):
  8. tp = N: the published DiT on N NCCL ranks (tests.spawn.run_ranks), the same weights on every rank
     (broadcast from rank 0), the sharded forward against the one-GPU forward at the published geometry
     (bf16, relative error) and the speed-up of a step over tp = 1 measured in the same processes;
  9. NCCL faults: `python -m k4flash.app.launch --standalone --nproc-per-node N tests/fault_worker.py
     model=tiny time_length=0 width=512 height=512 progress=false device=cuda parallel.timeout_s=60` with
     K4FLASH_TEST_FAULT = kill:1:2, hang:1:2, stop:1:2, raise:1:3 (tests/fault_worker.py injects it from
     outside the product), each capped at --fault-cap-s: exit status, seconds from the fault line to the
     exit, rank 0's `error:` line. The tiny weights are built in a temporary K4FLASH_CACHE, offline.

The run goes 1, 2, 3 (eager), 6 (on the eager model, the pipeline's default), 3 (compiled: a compile
cannot be undone), 4, 8, 9. A last table checks the figures against bounds (finite outputs, kernel and
bf16 errors, no sync in the step loop, the estimate under the seed's 11 s, tp parity and speed-up, each
fault named and bounded).
Exit status: 0 when every check passes, 1 when one fails, 2 without CUDA and without --smoke.
`--smoke` (= --device cpu) runs sections 1-7 with the tiny config (k4flash.tiny) at a tiny geometry in
fp32: no CUDA events, so the sync counts are 0 by construction and GPU-only checks read "-"; with
`--gpus N` it also runs 8 and 9 on N gloo ranks.
"""
import argparse
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

if __package__ in (None, ""):  # `python bench/gpu_check.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_dit import Timer, build_random_dit, measure  # noqa: E402
from bench.report import Report, add_output_args  # noqa: E402
from k4flash.dit_math import attention_backends  # noqa: E402
from k4flash.published import NUM_STEPS, PUBLISHED_DIT_PARAMS, TEXT_TOKENS  # noqa: E402
from k4flash.tiny import TINY_DIT_PARAMS, TINY_VAE_CONFIG  # noqa: E402
from k4flash import cost  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # fidelity_latent: 3 frames of 48 x 84 → 3,024 + 224 tokens; 48 heads of fp32 scores = 1.9 GiB per copy.
    "published": dict(params=PUBLISHED_DIT_PARAMS, latent=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                      fidelity_latent=(3, 48, 84), vae=None, vae_latent=cost.PUBLISHED_LATENT),
    "tiny": dict(params=TINY_DIT_PARAMS, latent=(3, 8, 12), text_tokens=20, fidelity_latent=(3, 8, 12),
                 vae=TINY_VAE_CONFIG, vae_latent=(3, 8, 12)),
}
TIMESTEP = 749.0
MATH_SCORES_LIMIT_GIB = 20.0
# Bounds of the checks. fp32 kernels differ only in summation order: ~1e-6 per attention; the published
# model stacks 42 blocks over 3,248 tokens, the tiny one 2 over 308, hence the looser GPU bound.
FP32_KERNEL_REL = {"cuda": 1e-3, "cpu": 1e-4}
BF16_REL_L2 = 0.1  # bf16 (8-bit mantissa) through every block, against fp32: a few 1e-2 expected
TP_REL_L2 = 0.05  # the same bf16 maths, summed in another order across ranks
FAULTS = [  # K4FLASH_TEST_FAULT, what rank 0's one error line must say (tests/test_faults.py)
    ("kill:1:2", r"rank 1 died or froze"),
    ("hang:1:2", r"rank 1 is hung"),
    ("stop:1:2", r"rank 1 died or froze"),  # SIGSTOP: alive to the launcher, frozen to its peers
    ("raise:1:3", r"rank 1 failed during prompt 0: MemoryError"),
]
FAULT_SLACK_S = 30  # after the collective timeout: rank 0's diagnosis and the launcher's teardown
# Host-blocking CUDA calls as the profiler names them (runtime API, driver API; an optional _vNNNN suffix).
SYNC_CALL = re.compile(r"^cu(da)?(StreamSynchronize|DeviceSynchronize|CtxSynchronize|EventSynchronize|"
                       r"Memcpy|MemcpyDtoH)(_v\d+)?$")
MARK_SAMPLER, MARK_DIT, MARK_STEP_END = "gpu_check.sampler", "gpu_check.dit_call", "gpu_check.step_end"
T0 = time.perf_counter()


def log(message):
    """Progress on stderr: an 8-minute run should show where it is."""
    print(f"[gpu_check {time.perf_counter() - T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def autocast_for(device, dtype):
    # As the pipeline: bf16 weights under autocast (LayerNorms in float32), nothing for fp32.
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dit_inputs(params, latent, text_tokens, device, dtype, seed=1):
    """x (1, F, H, W, C), text (1, L, in_text_dim), t (1,): drawn on the CPU, the same on every device and rank."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *latent, params["in_visual_dim"], generator=generator)
    text = torch.randn(1, text_tokens, params["in_text_dim"], generator=generator)
    return x.to(device, dtype), text.to(device, dtype), torch.full((1,), TIMESTEP, device=device)


def compare(out, ref) -> dict:
    diff = out.double() - ref.double()
    ref_max = ref.double().abs().max()
    return dict(max_abs_err=float(diff.abs().max()), max_rel_err=float(diff.abs().max() / ref_max),
                rel_l2_err=float(diff.norm() / ref.double().norm()), ref_max_abs=float(ref_max))


def set_dtype_(model, dtype):
    """Cast the DiT's parameters in place; bf16 → fp32 → bf16 restores them exactly. The RoPE buffers are
    rebuilt in float32 (the forward recomputes its tables, but they should not stay rounded)."""
    device = next(model.parameters()).device
    model.to(dtype)
    model.init_derived_buffers()
    return model.to(device)


class StageMemory:
    """Peak memory per stage. CUDA: max_memory_allocated after a reset at the stage's start (this process's
    tensors, GiB). CPU: the process's peak RSS (VmHWM) after resetting the kernel's mark (clear_refs)."""

    def __init__(self, device):
        self.device = device
        self.rows = []

    def _now_gib(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        return _status_kib("VmRSS") / 2**20

    @contextlib.contextmanager
    def stage(self, name):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # not every kernel lets a process reset its mark
                Path("/proc/self/clear_refs").write_text("5")
        start = self._now_gib()
        yield
        synchronize(self.device)
        # CPU: the kernel updates VmHWM from per-thread RSS counters in batches, so it can trail VmRSS by
        # a few hundred kB; the peak is at least where the stage started and ended.
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
                else max(_status_kib("VmHWM") / 2**20, start, self._now_gib()))
        self.rows.append(dict(stage=name, start_gib=start, peak_gib=peak, growth_gib=peak - start))


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# ---------------------------------------------------------------------------- 2. SDPA backends vs math


def sdpa_backend_used(names, device, dtype, heads, head_dim):
    """The backend SDPA takes among `names` (it takes the first that supports the inputs), by trying each alone."""
    q = torch.randn(1, heads, 256, head_dim, device=device, dtype=dtype)
    for name in names:
        try:
            with attention_backends((name,)), torch.no_grad(), _quiet_warnings():
                F.scaled_dot_product_attention(q, q, q)
            return name
        except RuntimeError:  # "No available kernel": this backend does not take these inputs
            continue
    return None


@contextlib.contextmanager
def _quiet_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each refused backend warns why; the probe only wants the answer
        yield


def check_backends(model, config, device, dtype):
    """Section 2: rows comparing the default backends (fp32 and bf16) against fp32 math at the reduced geometry."""
    params = config["params"]
    latent, text_tokens = config["fidelity_latent"], config["text_tokens"]
    tokens = cost.dit_tokens(params, latent) + text_tokens
    heads = params["model_dim"] // sum(params["axes_dims"])
    scores_gib = tokens**2 * heads * 4 / 2**30
    assert scores_gib < MATH_SCORES_LIMIT_GIB, f"math attention would hold {scores_gib:.1f} GiB of scores"
    x, text, t = dit_inputs(params, latent, text_tokens, device, torch.float32)
    default = tuple(model.sdpa_backends)

    def forward(run_dtype, backends):
        model.sdpa_backends = backends
        try:
            with torch.no_grad(), autocast_for(device, run_dtype)():
                return model(x.to(run_dtype), text.to(run_dtype), t).float()
        finally:
            model.sdpa_backends = default

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    try:
        set_dtype_(model, torch.bfloat16)
        bf16_default = forward(torch.bfloat16, default)
        set_dtype_(model, torch.float32)  # the same (bf16-representable) weights: only the arithmetic differs
        fp32_default = forward(torch.float32, default)
        fp32_math = forward(torch.float32, ("math",))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        set_dtype_(model, dtype)
    head_dim = sum(params["axes_dims"])
    common = dict(allowed=", ".join(default), latent="x".join(map(str, latent)), tokens=tokens,
                  math_scores_gib=scores_gib)
    rows = [
        dict(compared="fp32, default backends vs fp32, math", dtype="float32",
             kernel=sdpa_backend_used(default, device, torch.float32, heads, head_dim),
             finite=bool(torch.isfinite(fp32_default).all() and torch.isfinite(fp32_math).all()),
             **compare(fp32_default, fp32_math), **common),
        dict(compared="bf16 autocast, default backends vs fp32, math", dtype="bfloat16",
             kernel=sdpa_backend_used(default, device, torch.bfloat16, heads, head_dim),
             finite=bool(torch.isfinite(bf16_default).all()), **compare(bf16_default, fp32_math), **common),
    ]
    return rows


# ---------------------------------------------------------------------------- 3. step latency


def time_steps(model, inputs, device, dtype, warmup, repeats, flops, peak, label):
    row = dict(variant=label, **measure(model, inputs, Timer(device), warmup, repeats, autocast_for(device, dtype)))
    row["tflops"] = flops / row["median_s"] / 1e12
    row["mfu"] = flops / row["median_s"] / peak if peak else None
    row["four_steps_s"] = NUM_STEPS * row["median_s"]
    return row


# ---------------------------------------------------------------------------- 4. VAE decode


@torch.no_grad()
def build_random_vae(vae_config, device, dtype, seed=0):
    """AutoencoderKLCogVideoX(**vae_config) (None: the published config) materialised on `device` in `dtype`:
    built on meta, so no host copy; convolutions ~ N(0, 1/fan_in), GroupNorm scales 1, biases 0, and the last
    convolution 0.3x so frames use the [-1, 1] range without saturating (as k4flash.tiny does)."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**(vae_config or {}))
    # nn.Module.to, not diffusers' override, which warns about fp32 modules this model does not have.
    vae = torch.nn.Module.to(vae, dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in vae.named_parameters():
        if param.ndim >= 2:  # (out, in, *kernel)
            param.normal_(0.0, 1 / math.sqrt(math.prod(param.shape[1:])), generator=generator)
        elif name.endswith("weight"):  # the only 1-D weights are GroupNorm scales
            param.fill_(1.0)
        else:
            param.zero_()
    for param in vae.decoder.conv_out.parameters():
        param.mul_(0.3)
    return vae.eval().requires_grad_(False)


def time_vae_decode(config, device, dtype, warmup, repeats):
    """Section 4: the pipeline's decode stage (decode_latents) on random latents (F, h, w, 16)."""
    from k4flash.vae import decode_latents

    clock = time.perf_counter()
    vae = build_random_vae(config["vae"], device, dtype)
    build_s = time.perf_counter() - clock
    latent = config["vae_latent"]
    latents = torch.randn(*latent, vae.config.latent_channels, generator=torch.Generator().manual_seed(2)).to(device)
    timer = Timer(device)
    finite = []
    # Finiteness from the decoder's own output (the frames are uint8 by then); the flags stay on the device.
    hook = vae.decoder.register_forward_hook(
        lambda module, args, out: finite.append(torch.isfinite(out[0] if isinstance(out, tuple) else out).all()))
    frames = []
    try:
        first_s = timer(lambda: frames.append(decode_latents(vae, latents)))
    finally:
        hook.remove()
    for _ in range(max(warmup - 1, 0)):
        timer(lambda: decode_latents(vae, latents))
    times = [timer(lambda: decode_latents(vae, latents)) for _ in range(repeats)]
    del vae
    return dict(latent="x".join(map(str, latent)), frames="x".join(map(str, frames[0].shape[1:4])),
                build_s=build_s, first_call_s=first_s, median_s=statistics.median(times), min_s=min(times),
                times_s=times, chunks=len(finite), output_finite=bool(torch.stack(finite).all()))


# ---------------------------------------------------------------------------- 6. sampler host syncs


def profile_sampler(model, config, device, dtype):
    """Section 6: sample() driving the DiT as Kandinsky4T2VPipeline.denoise does, once under the profiler, once
    timed under torch.cuda's sync debug mode (a second counter of the same syncs, independent of the profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from k4flash.sampler import load_schedule, sample

    params = config["params"]
    shape = (*config["latent"], params["in_visual_dim"])
    _, text, _ = dit_inputs(params, config["latent"], config["text_tokens"], device, dtype)
    schedule = load_schedule()
    autocast = autocast_for(device, dtype)
    # Where the loop starts and ends: profiler ranges, and how many sync warnings were caught by then.
    live, positions = {"warnings": []}, {"dit": [], "step_end": []}

    def velocity(latent, timestep):  # k4flash/pipeline.py Kandinsky4T2VPipeline.denoise's closure
        positions["dit"].append(_sync_warnings(live["warnings"]))
        with record_function(MARK_DIT):
            t = torch.full((1,), float(timestep), device=device)
            with autocast():
                return model(latent[None].to(dtype), text, t)[0]

    def on_step(i, timestep, latent):
        positions["step_end"].append(_sync_warnings(live["warnings"]))
        with record_function(MARK_STEP_END):
            pass

    def run():
        with torch.no_grad():
            return sample(velocity, shape, schedule, seed=0, device=device, on_step=on_step)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(MARK_SAMPLER):
            latents = run()
        synchronize(device)  # outside the marked range: neither this sync nor the profiler's is counted
    counts = count_syncs(prof.events())

    positions["dit"].clear()
    positions["step_end"].clear()
    clock = time.perf_counter()  # not Timer: its own synchronize would be caught as one of the sampler's syncs
    with sync_debug_warnings(device) as warned:
        live["warnings"] = warned
        run()
    synchronize(device)
    sampler_s = time.perf_counter() - clock
    first, last = positions["dit"][0], positions["step_end"][-1]
    return dict(steps=len(schedule.timesteps), **counts, warned_before_loop=first, warned_in_loop=last - first,
                warned_after_loop=_sync_warnings(warned) - last, latents_finite=bool(torch.isfinite(latents).all()),
                sampler_s=sampler_s, profiler="CPU + CUDA" if device.type == "cuda" else "CPU only")


@contextlib.contextmanager
def sync_debug_warnings(device):
    """torch.cuda.set_sync_debug_mode("warn"): a warning at every synchronizing CUDA call; yields the list
    they are recorded in (always empty on the CPU, where nothing synchronizes)."""
    import warnings

    if device.type != "cuda":
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not the first per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _sync_warnings(caught) -> int:
    return sum("synchroniz" in str(w.message) for w in caught)  # "called a synchronizing CUDA operation"


def count_syncs(events) -> dict:
    """Host-blocking CUDA calls in the sampler's range, split at the first DiT call and the last on_step."""
    def ranges(name):  # the host-side ranges: with CUDA activity each marker also has a GPU-side annotation
        return [e.time_range for e in events if e.name == name and e.device_type == DeviceType.CPU]

    start = min(r.start for r in ranges(MARK_SAMPLER))
    end = max(r.end for r in ranges(MARK_SAMPLER))
    loop_start = min(r.start for r in ranges(MARK_DIT))
    loop_end = max(r.start for r in ranges(MARK_STEP_END))
    syncs = [e.time_range.start for e in events if SYNC_CALL.match(e.name) and start <= e.time_range.start <= end]
    dtoh = [e for e in events if "Memcpy DtoH" in e.name and start <= e.time_range.start <= end]
    return dict(syncs_before_loop=sum(s < loop_start for s in syncs),
                syncs_in_loop=sum(loop_start <= s <= loop_end for s in syncs),
                syncs_after_loop=sum(s > loop_end for s in syncs), syncs_total=len(syncs), dtoh_copies=len(dtoh),
                sampler_profiled_s=(end - start) / 1e6)


# ---------------------------------------------------------------------------- 7. end to end


def end_to_end_rows(step_rows, sampler_row, vae_row):
    """T5 (cost model: T5-XXL on an H100, weights read once) + 4 steps + the decode, per way of stepping."""
    t5_s = cost.predict(vae=dict(conv_flops=0, elementwise_bytes=0))["t5_s"]
    denoise = [(f"{NUM_STEPS} x step median, {row['variant']}", NUM_STEPS * row["median_s"]) for row in step_rows]
    if sampler_row:
        denoise.append(("sample() measured, eager", sampler_row["sampler_s"]))
    rows = []
    for label, denoise_s in denoise:
        total = t5_s + denoise_s + vae_row["median_s"]
        rows.append(dict(denoise=label, t5_s=t5_s, denoise_s=denoise_s, vae_s=vae_row["median_s"], total_s=total,
                         seed_claim_s=cost.SEED_CLAIM_S, vs_seed=cost.SEED_CLAIM_S / total))
    return rows


# ---------------------------------------------------------------------------- 8. tensor parallel


def _timed_forwards(forward, timer, warmup, repeats, barrier=None):
    with torch.no_grad():
        for _ in range(warmup):
            timer(forward)
        times = []
        for _ in range(repeats):
            if barrier:
                barrier()  # every rank starts the step together
            times.append(timer(forward))
    return times


def _tp_rank(runtime, config_name, warmup, repeats):
    """One rank: the full model alone (tp = 1), then sharded over the group (tp = N); the same inputs."""
    import torch.distributed as dist

    from parallel.tp import parallelize_dit

    device = runtime.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CONFIGS[config_name]
    model = build_random_dit(config["params"], device, dtype)
    with torch.no_grad():
        for param in model.parameters():  # the same weights everywhere, whatever each device's generator does
            dist.broadcast(param, src=0)
    x, text, t = dit_inputs(config["params"], config["latent"], config["text_tokens"], device, dtype)
    autocast = autocast_for(device, dtype)

    def forward():
        with autocast():
            return model(x, text, t)

    timer = Timer(device)
    one_times = _timed_forwards(forward, timer, warmup, repeats)
    with torch.no_grad():
        reference = forward().float()
    parallelize_dit(model, runtime.dit_mesh)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the full weights are gone; leave the shard's peak clean
        torch.cuda.reset_peak_memory_stats(device)
    sharded_times = _timed_forwards(forward, timer, warmup, repeats, barrier=runtime.barrier)
    with torch.no_grad():
        out = forward().float()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(one_times=one_times, sharded_times=sharded_times, finite=bool(torch.isfinite(out).all()),
                sharded_peak_gib=peak, **compare(out, reference))


def tensor_parallel_rows(world, config_name, device_type, warmup, repeats):
    from tests.spawn import run_ranks

    per_rank = run_ranks(world, _tp_rank, config_name, warmup, repeats, device=device_type, timeout=600)
    one = per_rank[0]["one_times"]
    # A TP step is as slow as its slowest rank: per repeat the max over ranks, then the median.
    sharded = [max(ts) for ts in zip(*(r["sharded_times"] for r in per_rank))]
    worst = max(per_rank, key=lambda r: r["rel_l2_err"])
    base = statistics.median(one)
    peaks = [r["sharded_peak_gib"] for r in per_rank if r["sharded_peak_gib"] is not None]
    return [dict(tp=1, median_s=base, min_s=min(one), speedup=1.0, max_rel_err=0.0, rel_l2_err=0.0, finite=True,
                 peak_gib=None),
            dict(tp=world, median_s=statistics.median(sharded), min_s=min(sharded),
                 speedup=base / statistics.median(sharded), max_rel_err=worst["max_rel_err"],
                 rel_l2_err=worst["rel_l2_err"], finite=all(r["finite"] for r in per_rank),
                 peak_gib=max(peaks) if peaks else None)]


# ---------------------------------------------------------------------------- 9. faults


def run_fault(fault, world, device_type, timeout_s, cap_s, cache, workdir):
    """One launch with a fault injected into rank 1: (exit status, seconds fault → exit, error lines, capped)."""
    command = [sys.executable, "-m", "k4flash.app.launch", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "tests" / "fault_worker.py"), "model=tiny", "time_length=0", "width=512", "height=512",
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


# ---------------------------------------------------------------------------- checks


RELATIONS = {"<=": lambda value, bound: value <= bound, ">": lambda value, bound: value > bound,
             "==": lambda value, bound: value == bound}


def check(name, value, relation, bound, applies=True) -> dict:
    """One row of the checks table; passed is None where the check does not apply to this device or config."""
    passed = (value is not None and RELATIONS[relation](value, bound)) if applies else None
    return dict(check=name, value=value, bound=f"{relation} {_fmt(bound)}", passed=passed)


def check_rows(device, config_name, sections, world, timeout_s, errors=None):
    """The verdicts; a section that raised (errors: name → its error line) fails, the checks on it are left out."""
    cuda = device.type == "cuda"
    published_gpu = cuda and config_name == "published"  # the seed's 11 s and a TP speed-up mean something
    rows = [check(f"section {name} ran", error, "==", "ok") for name, error in (errors or {}).items()]
    finite = [r["output_finite"] for r in sections.get("steps") or []]
    finite += [r["finite"] for r in sections.get("backends") or []]
    finite += [sections[key][flag] for key, flag in (("vae", "output_finite"), ("sampler", "latents_finite"))
               if sections.get(key)]
    rows.append(check("every DiT and VAE output finite", all(finite), "==", True))
    if sections.get("backends"):
        fp32, bf16 = sections["backends"]
        rows += [check(f"fp32 {fp32['kernel']} vs fp32 math: max rel err", fp32["max_rel_err"], "<=",
                       FP32_KERNEL_REL[device.type]),
                 check(f"bf16 {bf16['kernel']} vs fp32 math: rel L2 err", bf16["rel_l2_err"], "<=", BF16_REL_L2)]
    if sections.get("sampler"):
        sampler = sections["sampler"]
        warned = sampler["warned_before_loop"] + sampler["warned_in_loop"] + sampler["warned_after_loop"]
        rows += [check("sampler: host syncs in the step loop (profiler)", sampler["syncs_in_loop"], "==", 0,
                       applies=cuda),
                 check("sampler: host syncs in the whole call (profiler; the finite check)", sampler["syncs_total"],
                       "<=", 1, applies=cuda),
                 check("sampler: sync warnings in the step loop (sync debug mode)", sampler["warned_in_loop"], "==", 0,
                       applies=cuda),
                 check("sampler: sync warnings in the whole call (sync debug mode)", warned, "<=", 1, applies=cuda)]
    if sections.get("end_to_end"):
        rows.append(check("end-to-end estimate, best row s", min(r["total_s"] for r in sections["end_to_end"]), "<=",
                          cost.SEED_CLAIM_S, applies=published_gpu))
    if sections.get("tp"):
        sharded = sections["tp"][1]
        rows += [check(f"tp={world} vs tp=1: rel L2 err", sharded["rel_l2_err"], "<=", TP_REL_L2 if cuda else 1e-5),
                 check(f"tp={world} speed-up over tp=1", sharded["speedup"], ">", 1.0, applies=published_gpu)]
    for row in sections.get("faults") or []:
        rows += [check(f"{row['fault']}: non-zero exit within the cap",
                       row["exit_status"] not in (0, None) and not row["capped"], "==", True),
                 check(f"{row['fault']}: one error line, naming rank 1", row["names_culprit"], "==", True),
                 check(f"{row['fault']}: seconds from the fault to the exit", row["fault_to_exit_s"], "<=",
                       timeout_s + FAULT_SLACK_S)]
    return rows


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


# ---------------------------------------------------------------------------- main


def _fmt(value):
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny config (= --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: published on CUDA, tiny on the CPU")
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks for sections 8 and 9 (default: every visible GPU; 1 skips them)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: intra-op threads (tiny models on a busy machine are fastest on one)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vae-repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    parser.add_argument("--compile-backend", default=None, help="default: inductor; aot_eager on the CPU")
    parser.add_argument("--no-faults", action="store_true", help="skip section 9")
    parser.add_argument("--fault-timeout-s", type=float, default=60.0, help="parallel.timeout_s of the fault runs")
    parser.add_argument("--fault-cap-s", type=float, default=120.0, help="wall-clock cap of each fault run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (H100: 989.4)")
    parser.add_argument("--out", type=Path, help="write DIR/gpu_check.json and DIR/gpu_check.md")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    return parser, args


@dataclass
class Run:
    """What this run measures on: the device, the config and what follows from them."""
    device: torch.device
    config_name: str
    dtype: torch.dtype
    world: int  # ranks for sections 8 and 9
    compile_backend: str
    card: str
    peak_flops: float  # the card's dense bf16 peak for MFU; None where unknown

    @property
    def config(self) -> dict:
        return CONFIGS[self.config_name]

    @property
    def flops(self) -> dict:
        return cost.dit_flops(self.config["params"], self.config["latent"], self.config["text_tokens"])


def resolve_run(parser, args) -> Run:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench.gpu_check needs a CUDA device and none is visible; "
              "`python -m bench.gpu_check --smoke` runs the same code paths on the CPU", file=sys.stderr)
        sys.exit(2)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        card = f"CPU ({torch.get_num_threads()} threads)"
        world = args.gpus or 1
    else:
        device = torch.device("cuda", 0 if device.index is None else device.index)
        torch.cuda.set_device(device)
        card = torch.cuda.get_device_name(device)
        world = args.gpus if args.gpus is not None else torch.cuda.device_count()
        if world > torch.cuda.device_count():
            parser.error(f"--gpus {world}: {torch.cuda.device_count()} GPUs visible")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (cost.H100_SXM.peak_bf16_flops if "H100" in card else None)
    return Run(device, args.config or ("published" if device.type == "cuda" else "tiny"),
               torch.bfloat16 if device.type == "cuda" else torch.float32, world,
               args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"), card, peak)


def one_device_sections(run: Run, args, memory: StageMemory) -> Sections:
    """Sections 1-7 on one device, in the order that needs each model state once: fp32 round trip, eager
    (the pipeline's default), the sampler on the eager model, then the compile, which cannot be undone."""
    device, dtype, config = run.device, run.dtype, run.config
    params, flops = config["params"], run.flops["total"]
    log(f"1. building the {run.config_name} DiT on {run.card}")
    clock = time.perf_counter()
    with memory.stage("1. build the DiT (random weights)"):
        model = build_random_dit(params, device, dtype)  # without it nothing else runs: not guarded
        synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    sections = Sections()
    sections["model"] = dict(config=run.config_name, params_billion=n_params / 1e9,
                             weights_gib=n_params * dtype.itemsize / 2**30, latent="x".join(map(str, config["latent"])),
                             tokens=f"{run.flops['visual_tokens']}+{config['text_tokens']}",
                             build_s=time.perf_counter() - clock)
    inputs = dit_inputs(params, config["latent"], config["text_tokens"], device, dtype)

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


def add_tables(report: Report, run: Run, args, sections: Sections, memory: StageMemory, checks: list) -> None:
    """One table per section that ran (a section that raised has its error line in the checks instead)."""
    tables = [
        ("model", "1. DiT at the geometry of the run", [
            ("config", "config", None), ("params_billion", "parameters (B)", ".3f"),
            ("weights_gib", "weights GiB", ".2f"), ("latent", "latent", None), ("tokens", "tokens", None),
            ("build_s", "build s", ".2f")]),
        ("backends", "2. SDPA backends against the math kernel (one forward, reduced geometry)", [
            ("compared", "compared", None), ("allowed", "default backends", None), ("kernel", "SDPA picks", None),
            ("latent", "latent", None), ("tokens", "tokens", None), ("math_scores_gib", "math S² scores GiB", ".2f"),
            ("max_abs_err", "max abs err", ".3g"), ("max_rel_err", "max abs err / max |ref|", ".3g"),
            ("rel_l2_err", "rel L2 err", ".3g"), ("finite", "finite", None)]),
        ("steps", f"3. DiT step (one forward) on {run.card}", [
            ("variant", "variant", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
            ("first_call_s", "first call s", ".2f"), ("tflops", "achieved TFLOP/s", ".3g"), ("mfu", "MFU", ".1%"),
            ("four_steps_s", f"{NUM_STEPS} steps s", ".3f"), ("output_finite", "finite", None)]),
        ("vae", "4. VAE decode (2 latent frames per chunk, uint8 frames on the host)", [
            ("latent", "latent", None), ("frames", "frames TxHxW", None), ("chunks", "chunks", None),
            ("build_s", "build s", ".2f"), ("first_call_s", "first call s", ".2f"),
            ("median_s", "median s", ".3f"), ("min_s", "min s", ".3f"), ("output_finite", "finite", None)]),
        ("memory", "5. Peak memory per stage (CUDA: allocated; CPU: process RSS)", [
            ("stage", "stage", None), ("start_gib", "at start GiB", ".2f"), ("peak_gib", "peak GiB", ".2f"),
            ("growth_gib", "peak - start GiB", ".2f")]),
        ("sampler", "6. Sampler host syncs: CUDA calls in the profile, then sync debug mode's warnings", [
            ("steps", "steps", None), ("profiler", "activities", None),
            ("syncs_before_loop", "before the loop", None), ("syncs_in_loop", "in the step loop", None),
            ("syncs_after_loop", "after the loop", None), ("dtoh_copies", "DtoH copies", None),
            ("warned_before_loop", "sync warnings before", None), ("warned_in_loop", "in the loop", None),
            ("warned_after_loop", "after", None), ("sampler_profiled_s", "profiled s", ".3f"),
            ("sampler_s", "unprofiled s", ".3f"), ("latents_finite", "finite", None)]),
        ("end_to_end", f"7. End-to-end estimate against the seed's {cost.SEED_CLAIM_S:g} s", [
            ("denoise", "denoise from", None), ("t5_s", "T5 s (cost model)", ".3f"),
            ("denoise_s", "denoise s", ".3f"), ("vae_s", "VAE s", ".3f"), ("total_s", "total s", ".3f"),
            ("vs_seed", "seed / total", ".2f")]),
        ("tp", f"8. Tensor parallel ({'NCCL' if run.device.type == 'cuda' else 'gloo'}, {run.config_name} DiT)", [
            ("tp", "tp", None), ("median_s", "step median s", ".4f"), ("min_s", "min s", ".4f"),
            ("speedup", "speed-up", ".2f"), ("max_rel_err", "max rel err vs tp=1", ".3g"),
            ("rel_l2_err", "rel L2 err vs tp=1", ".3g"), ("peak_gib", "peak GiB / rank", ".2f"),
            ("finite", "finite", None)]),
        ("faults", f"9. Faults on {run.world} ranks (parallel.timeout_s={args.fault_timeout_s:g})", [
            ("fault", "K4FLASH_TEST_FAULT", None), ("exit_status", "exit", None), ("capped", "capped", None),
            ("fault_to_exit_s", "fault → exit s", ".1f"), ("error_line", "rank 0's error line", None),
            ("outputs_left", "files left", None)]),
    ]
    figures = dict(sections, memory=memory.rows)
    for key, title, columns in tables:
        rows = figures.get(key)
        if rows:
            report.table(title, columns, rows if isinstance(rows, list) else [rows])
    report.table("Checks", [("check", "check", None), ("value", "value", _fmt), ("bound", "bound", _fmt),
                            ("passed", "passed", _fmt)], checks)


def main(argv=None):
    parser, args = parse_args(argv)
    run = resolve_run(parser, args)
    report = Report("gpu_check", config=run.config_name, device=run.card, dtype=str(run.dtype).replace("torch.", ""),
                    latent="x".join(map(str, run.config["latent"])), warmup=args.warmup, repeats=args.repeats,
                    compile_backend=None if args.no_compile else run.compile_backend, gpus=run.world)
    memory = StageMemory(run.device)
    sections = one_device_sections(run, args, memory)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()  # the DiT is gone: the ranks of 8 and 9 need this GPU too
    if run.world > 1:
        log(f"8. tensor parallel, tp={run.world}")
        sections.run("tp", "8", tensor_parallel_rows, run.world, run.config_name, run.device.type, args.warmup,
                     args.repeats)
        if args.no_faults:
            report.note("9. faults skipped (--no-faults)")
        else:
            sections.run("faults", "9", fault_rows, run.world, run.device.type, args.fault_timeout_s, args.fault_cap_s)
    else:
        report.note("8-9. tensor parallel and NCCL faults skipped: one rank (--gpus N, N > 1, runs them)")

    checks = check_rows(run.device, run.config_name, sections, run.world, args.fault_timeout_s, sections.errors)
    report.settings["checks_passed"] = all(c["passed"] is not False for c in checks)
    add_tables(report, run, args, sections, memory, checks)
    if run.device.type != "cuda":
        report.note("CPU: the profiler records no CUDA calls, so the sync counts are 0 by construction; "
                    "checks marked - apply on a GPU only")
    report.note(f"FLOPs per step (cost.dit_flops): {run.flops['total'] / 1e12:.4g} TFLOP; T5 from cost.predict "
                "(T5-XXL on an H100, the larger of compute and one read of its weights), not run")
    json_path, md_path = args.json, args.md
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = json_path or args.out / "gpu_check.json", md_path or args.out / "gpu_check.md"
    log("done")
    return report.emit(json_path, md_path)


if __name__ == "__main__":
    sys.exit(0 if main()["settings"]["checks_passed"] else 1)
