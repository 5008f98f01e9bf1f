"""Section 3: step latency, one DiT forward = one denoising step, and the TFLOP/s it achieves."""
from bench.configs import autocast_for
from bench.timing import Timer, measure
from k4flash.published import NUM_STEPS


def time_steps(model, inputs, device, dtype, warmup, repeats, flops, peak, label):
    row = dict(variant=label, **measure(model, inputs, Timer(device), warmup, repeats, autocast_for(device, dtype)))
    row["tflops"] = flops / row["median_s"] / 1e12
    row["mfu"] = flops / row["median_s"] / peak if peak else None
    row["four_steps_s"] = NUM_STEPS * row["median_s"]
    return row
