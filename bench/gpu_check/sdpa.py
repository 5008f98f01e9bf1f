"""Section 2's kernel table: each SDPA backend alone, one attention of the DiT timed at the run's geometry and
checked against fp32 math at the reduced one (where math's S x S scores fit).

On Hopper attention is most of a step, so which kernel runs matters: this table is what a first GPU hour needs to
decide the model's order (k4flash/dit_math.py DEFAULT_SDPA_BACKENDS). A backend that refuses the inputs is listed
as unavailable, not failed; the fastest available one within the bound is marked.
"""
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.gpu_check.run import compare
from bench.timing import Timer, time_calls
from parallel import cost

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# One attention in bf16 (inputs rounded to bf16, fp32 accumulation) against fp32 math on the same numbers: a few
# bf16 roundings of the output, ~1e-2 relative at most.
BF16_ATTENTION_REL_L2 = 2e-2
FP32_ATTENTION_REL_L2 = 1e-5  # fp32 kernels differ only in summation order


def _qkv(params, latent, text_tokens, device, dtype, seed=2):
    """q, k, v (1, heads, S, head_dim) for the DiT's joint attention over S = visual + text tokens; drawn on the CPU
    so that every device sees the same numbers."""
    head_dim = sum(params["axes_dims"])
    heads = params["model_dim"] // head_dim
    tokens = cost.dit_tokens(params, latent) + text_tokens
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, tokens, head_dim, generator=generator).to(device, dtype) for _ in range(3)]


def _attend(name, q, k, v):
    with sdpa_kernel([KERNELS[name]]), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refused backend warns why; its RuntimeError says it too
        return F.scaled_dot_product_attention(q, k, v)


def kernel_rows(config, device, dtype, warmup, repeats) -> list:
    """One row per backend: available, seconds per attention at the run's geometry (median), its error against
    fp32 math at the reduced geometry, and whether it is the fastest within the bound."""
    params, text_tokens = config["params"], config["text_tokens"]
    full = _qkv(params, config["latent"], text_tokens, device, dtype)
    small = _qkv(params, config["fidelity_latent"], text_tokens, device, torch.float32)
    reference = _attend("math", *small)
    timer = Timer(device)
    rows = []
    for name in ("cudnn", "flash", "efficient"):
        row = dict(kernel=name, dtype=str(dtype).replace("torch.", ""), tokens=full[0].shape[2], available=True)
        try:
            got = _attend(name, *[t.to(dtype) for t in small]).float()
            for _ in range(warmup):
                _attend(name, *full)
            times = time_calls(lambda: _attend(name, *full), repeats, timer=timer)
        except RuntimeError as err:  # "No available kernel" (or a kernel that rejects this head size / dtype)
            rows.append(dict(row, available=False, note=str(err).strip().splitlines()[0][:120]))
            continue
        error = compare(got, reference)
        rows.append(dict(row, median_s=statistics.median(times), min_s=min(times), rel_l2_err=error["rel_l2_err"],
                         max_rel_err=error["max_rel_err"], within_bound=error["rel_l2_err"] <= (
                             FP32_ATTENTION_REL_L2 if dtype == torch.float32 else BF16_ATTENTION_REL_L2)))
    usable = [row for row in rows if row["available"] and row["within_bound"]]
    fastest = min(usable, key=lambda row: row["median_s"])["kernel"] if usable else None
    for row in rows:
        row["fastest"] = row["kernel"] == fastest
    return rows
