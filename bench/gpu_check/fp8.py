"""Section 12: the FP8 DiT (dit.quantize=fp8, k4flash/fp8.py) against the bf16 one at the run's geometry.

One random DiT (bench.random_weights, seed 0) in the run's dtype, timed and run once for its output; then the same
weights quantized in place by k4flash.fp8.quantize_dit with dit.fp8_skip's default, timed and run on the same input.
Per variant: step latency (median of --repeats after --warmup, CUDA events), the speed-up over the reference in the
same mode, the output's error against the reference's eager output, the parameters' bytes, the peak memory of the
stage it ran in (CUDA: max_memory_allocated; the stage's row is also in table 5), and one forward under a dispatch
mode that counts aten._scaled_mm: the proof that FP8 ran, and the FLOPs it did (2·M·K·N each).

MFU of an FP8 step: the time the step would take at the card's peaks (its _scaled_mm FLOPs at the fp8 peak, the
rest of cost.dit_flops at the bf16 peak, bench/gpu_check/peaks.py) over the measured time; a bf16 step's MFU is the
steps section's (all FLOPs at the bf16 peak).

Compiled (unless --no-compile): compile_blocks on each; the model is rebuilt from the same seed for FP8 (a compiled
block cannot go back to eager), and the rebuilt weights are checked equal to the first ones. When the time left to
the section's deadline (--budget-s / --section-cap-s) would not hold both compiles, they are skipped with the
reason in the table.
"""
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.configs import autocast_for, dit_inputs
from bench.gpu_check.peaks import peak_tflops
from bench.gpu_check.run import compare, log, seconds_left
from bench.gpu_check.steps import time_steps
from bench.random_weights import build_random_dit
from bench.timing import synchronize
from k4flash.fp8 import quantize_dit, quantized_layer_paths


class ScaledMatmuls(TorchDispatchMode):
    """Counts the aten._scaled_mm kernels that run inside it and their FLOPs (2·M·K·N each)."""

    def __init__(self):
        super().__init__()
        self.calls, self.flops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._scaled_mm:
            (m, k), n = args[0].shape, args[1].shape[1]
            self.calls += 1
            self.flops += 2 * m * k * n
        return func(*args, **(kwargs or {}))


def default_fp8_skip() -> tuple:
    """(dit.fp8_skip's default, where it was read): launch/config.py's DiTConfig is the one place it is set, but
    it imports hydra-core, which an offline node may lack (README "Offline GPU nodes"); then none is skipped."""
    try:
        from launch.config import DiTConfig
    except ImportError as err:
        return [], f"[] (launch.config not importable: {type(err).__name__}: {err})"[:120]
    return list(DiTConfig().fp8_skip), "launch.config DiTConfig"


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _fingerprint(model) -> float:
    """A sum over every parameter: equal for two builds from one seed, different for any other weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _forward(model, inputs, autocast):
    with torch.no_grad(), autocast():
        return model(*inputs)


def _count_scaled_mm(model, inputs, autocast) -> ScaledMatmuls:
    with ScaledMatmuls() as counted:
        _forward(model, inputs, autocast)
    return counted


def fp8_rows(run, args, memory, compile_s: float) -> list:
    """The section's rows: the reference and FP8 eager, then both compiled (or one row saying why not).

    compile_s: the seconds the compiled half is estimated to take (bench/gpu_check/sections.py), against the time
    left to the section's deadline."""
    config, device, dtype = run.config, run.device, run.dtype
    reference = str(dtype).replace("torch.", "")
    skip, skip_source = default_fp8_skip()
    inputs = dit_inputs(config, device, dtype)
    autocast = autocast_for(device, dtype)
    flops = run.flops["total"]
    peaks = peak_tflops(run.card, args.peak_tflops)
    bf16_peak, fp8_peak = [peaks[kind] * 1e12 if peaks[kind] else None for kind in ("bf16", "fp8")]
    backend = run.compile_backend

    def build(label):
        with memory.stage(f"12. build the DiT (random weights, {label})"):
            model = build_random_dit(config["params"], device, dtype)
        return model, _fingerprint(model)

    def timed(model, quantized, mode, against=None, fp8_flops=0):
        """One variant's row and its output (against: the reference's eager output, to compare with)."""
        kind = "fp8" if quantized else reference
        variant = f"{kind} eager" if mode == "eager" else f"{kind} torch.compile ({backend})"
        log(f"12. {variant}")
        with memory.stage(f"12. DiT step, {variant}"):
            row = time_steps(model, inputs, device, dtype, args.warmup, args.repeats, flops, run.peak_flops, variant)
            out = _forward(model, inputs, autocast)
            synchronize(device)
        row = dict(row, mode=mode, dtype="fp8 e4m3" if quantized else reference, peak_gib=memory.rows[-1]["peak_gib"],
                   weights_gib=weight_bytes(model) / 2**30)
        if against is not None:
            row.update(compare(out.float(), against.float()))
        if quantized:  # the step at the card's peaks: its FP8 matmuls at the fp8 one, the rest at the bf16 one
            row["mfu"] = ((fp8_flops / fp8_peak + (flops - fp8_flops) / bf16_peak) / row["median_s"]
                          if fp8_peak and bf16_peak else None)
        return row, out

    log(f"12. FP8 against {reference}: building the {run.config_name} DiT")
    model, first_weights = build("reference")
    row, ref = timed(model, False, "eager")
    rows = [dict(row, scaled_mm_calls=_count_scaled_mm(model, inputs, autocast).calls)]  # 0: nothing FP8 yet

    compiled, left = not args.no_compile, seconds_left()
    note = None if compiled else "--no-compile"
    if compiled and left is not None and left < compile_s:
        compiled, note = False, (f"its ~{compile_s:.0f} s (two compiles) would not fit the {max(left, 0):.0f} s "
                                 f"left to the section's deadline (--budget-s / --section-cap-s)")
    if compiled:
        row, _ = timed(model.compile_blocks(backend=backend), False, "compiled", ref)
        rows.append(row)
        del model, _
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model, rebuilt_weights = build("rebuilt for FP8: a compiled block stays compiled")
        if rebuilt_weights != first_weights:
            raise RuntimeError(f"the rebuilt DiT's weights differ from the first build's ({rebuilt_weights!r} != "
                               f"{first_weights!r}): FP8 would not be compared on the same weights")

    log(f"12. quantize_dit (fp8_skip={skip}, from {skip_source})")
    clock = time.perf_counter()
    with memory.stage("12. quantize_dit (in place)"):
        quantize_dit(model, skip)
        synchronize(device)
    quantize_s = time.perf_counter() - clock
    counted = _count_scaled_mm(model, inputs, autocast)
    expected = len(quantized_layer_paths(len(model.transformer_blocks), skip))
    row, _ = timed(model, True, "eager", ref, counted.flops)
    rows.append(dict(row, scaled_mm_calls=counted.calls, scaled_mm_expected=expected,
                     fp8_flop_share=counted.flops / flops, quantize_s=quantize_s, fp8_skip=str(skip),
                     fp8_skip_from=skip_source))
    if compiled:
        row, _ = timed(model.compile_blocks(backend=backend), True, "compiled", ref, counted.flops)
        rows.append(row)
    else:
        rows.append(dict(variant="torch.compile", mode="compiled", note=note))
    timed_rows = [row for row in rows if "median_s" in row]
    by_mode = {row["mode"]: row for row in timed_rows if row["dtype"] == reference}
    for row in timed_rows:
        row["speedup"] = by_mode[row["mode"]]["median_s"] / row["median_s"]
        row["weights_ratio"] = row["weights_gib"] / rows[0]["weights_gib"]
    return rows
