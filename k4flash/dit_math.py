"""The DiT's math in one small module: sinusoid frequencies, 3D RoPE and joint attention.

Kept in one place so the model, the tensor-parallel plan and the tests share one
definition of each formula (docs/model.md "DiT forward", steps 1, 4 and 5).
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The SDPA kernels joint attention may use; torch takes the first of them that supports the inputs.
# Flash first, then memory-efficient, then math, the always-correct fallback. cuDNN attention is
# left out on purpose: torch releases have shipped it with NaN and memory bugs for exactly this
# model's pattern (2.5.0, and again around 2.9). Change them per model:
# `dit.sdpa_backends = ("efficient", "math")` (any of SDPA_BACKENDS' names).
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DEFAULT_SDPA_BACKENDS = ("flash", "efficient", "math")


def sinusoid_freqs(num_freqs: int, max_period: float = 10000.0) -> torch.Tensor:
    """exp(-ln(max_period) * k / num_freqs) for k = 0..num_freqs-1, float32, on the CPU.

    The operation order and the device match the official code bit for bit (it matters for the
    time embedding, whose arguments reach ~1000 rad): a GPU's exp can differ in the last bit, so the
    frequencies are always made here and copied to a device once (the callers cache them per device).
    """
    k = torch.arange(start=0, end=num_freqs, dtype=torch.float32)
    return torch.exp(-math.log(max_period) * k / num_freqs)


def rope_angle_table(axis_dim: int, max_pos: int = 128, freqs: torch.Tensor = None) -> torch.Tensor:
    """Angles pos * freq for one RoPE axis: (max_pos, axis_dim // 2), float32, on the device of `freqs`
    (default: sinusoid_freqs(axis_dim // 2), on the CPU). One correctly rounded product per entry: the same
    bits on any device."""
    freqs = sinusoid_freqs(axis_dim // 2) if freqs is None else freqs
    pos = torch.arange(max_pos, dtype=torch.float32, device=freqs.device)
    return torch.outer(pos, freqs)


def rope_cos_sin(angle_tables, grid):
    """cos and sin of the RoPE angles for every token of a (F, H, W) patch grid.

    angle_tables: one (max_pos, d_a/2) table per axis; grid: (F, H, W) in patch units.
    Returns two (F*H*W, head_dim/2) float32 tensors, token order (f, h, w) row-major,
    angles concatenated in axis order (frame, row, column).
    """
    sizes = tuple(grid)
    for size, table in zip(sizes, angle_tables):
        if size > table.shape[0]:
            raise ValueError(f"RoPE supports at most {table.shape[0]} positions per axis, got grid {sizes}")
    f, h, w = sizes
    per_axis = [table[:size] for table, size in zip(angle_tables, sizes)]
    angles = torch.cat([
        per_axis[0][:, None, None, :].expand(f, h, w, -1),
        per_axis[1][None, :, None, :].expand(f, h, w, -1),
        per_axis[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, -1)  # (N, head_dim/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the given angles, in float32.

    x: (..., N, head_dim); cos, sin: (N, head_dim/2). Returns x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, head_dim/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention_backends(names=DEFAULT_SDPA_BACKENDS):
    """A context in which SDPA uses only the named backends (see SDPA_BACKENDS), in that order."""
    unknown = [name for name in names if name not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(f"SDPA backends {list(names)!r}: allowed names are {list(SDPA_BACKENDS)}")
    backends = [SDPA_BACKENDS[name] for name in names]
    try:  # without set_priority, torch keeps its own order among the allowed backends and "in that order" is false
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch < 2.6 has no set_priority: its fixed order (flash, efficient, math) is the default's
        return sdpa_kernel(backends)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention over all tokens of each sequence, no mask.

    q, k, v: (B, heads, N, head_dim), each a plain tensor. The kernel is SDPA's choice among the
    backends allowed around the call (DiffusionTransformer3D.forward: attention_backends); scale
    is 1/sqrt(head_dim) (SDPA's default).
    """
    return F.scaled_dot_product_attention(q, k, v)
