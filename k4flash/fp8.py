"""FP8 for the DiT's big matmuls (`dit.quantize=fp8`; docs/model.md "FP8").

What is quantized: in every transformer block not named in `fp8_skip`, the four linears that hold ~85 % of the
weights and FLOPs: `self_attention.to_query_key_value`, `self_attention.output_layer`, `feed_forward.in_layer`
and `feed_forward.out_layer`. Embeddings, modulation, norms and the output layer stay in the model's dtype.

How:
- weights: float8 e4m3 with one float32 scale per output channel (row), `weight ≈ q · scale[row]`;
- activations: e4m3 with one scale per token, computed at run time from the token's max |x|;
- the product: `torch._scaled_mm` (accumulates in float32, applies both scales, writes bf16), then the bias.
Per-tensor scales are not offered: one outlier row or token flattens every other one to a few levels.

A quantized layer keeps the attribute names of nn.Linear (`weight`, `bias`) plus `weight_scale` (out_features,),
so a state dict is the published keys plus one `.weight_scale` per quantized layer, and a tensor-parallel plan
shards the scale exactly like the bias (it belongs to the output rows).
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import validate_quantize  # torch-free: the app checks dit.quantize before importing torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANTIZED_LAYERS = ("self_attention.to_query_key_value", "self_attention.output_layer",
                    "feed_forward.in_layer", "feed_forward.out_layer")
SCALE_SUFFIX = "_scale"  # `<layer>.weight` → `<layer>.weight_scale`
_TINY = 1e-12  # an all-zero row or token gets this scale instead of 0 (its values quantize to 0 either way)


QUANTIZE_CHUNK_ELEMENTS = 1 << 24  # rows quantized at a time: a 64 MB float32 working copy at most


def quantize_rows(matrix: torch.Tensor):
    """(q, scale): matrix (rows, cols) → e4m3 q and float32 scale (rows,), q[r] · scale[r] ≈ matrix[r].

    Each row's max |value| maps to 448, e4m3's largest; the division is in float32 whatever the input dtype.
    A block of rows at a time, in place: the transient beyond q is one float32 block of at most
    QUANTIZE_CHUNK_ELEMENTS, not three full-size float32 copies (an eager MLP output layer's input at the
    published size is 1.2 GB in float32).
    """
    rows, cols = matrix.shape
    # max |x| per row, reduced in float32 without an |x| copy (exact: no rounding in abs or max)
    scale = torch.linalg.vector_norm(matrix, ord=float("inf"), dim=-1, dtype=torch.float32)
    scale = scale.div_(FP8_MAX).clamp_(min=_TINY)  # (rows,)
    q = torch.empty(rows, cols, dtype=FP8, device=matrix.device)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        block = matrix[start:start + step].to(torch.float32, copy=True)  # copy: never divide the input in place
        q[start:start + step] = block.div_(scale[start:start + step, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., in) @ weightᵀ with weight e4m3 (out, in) and weight_scale (out,): x is quantized per token here.

    The result is bf16 from the matmul (what Hopper's FP8 kernels write), returned in the dtype of the bias
    (the model's dtype: bf16 on a GPU, float32 in a float32 CPU run) with the bias added.
    """
    tokens = x.reshape(-1, x.shape[-1])  # (M, in)
    x_q, x_scale = quantize_rows(tokens)
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :].float(),
                           out_dtype=torch.bfloat16)  # (M, out)
    out = out.to(bias.dtype if bias is not None else x.dtype)  # a no-op in a bf16 run
    if bias is not None:
        out += bias  # in place: `out` is this call's own
    return out.unflatten(0, x.shape[:-1])


def linear(layer: nn.Module, x: torch.Tensor, bias=None) -> torch.Tensor:
    """`layer`'s matmul: FP8 when it holds a `weight_scale`, else F.linear; bias as given (a row-parallel layer
    adds it on one rank only)."""
    scale = getattr(layer, "weight_scale", None)
    if scale is None:
        return F.linear(x, layer.weight, bias)
    return fp8_linear(x, layer.weight, scale, bias)


class QuantizableLinear(nn.Module):
    """Base of the linear layers that may hold an FP8 weight (this module's Fp8Linear, and the tensor-parallel
    layers in parallel/tp.py): `model.to(dtype)` must leave an FP8 weight and its float32 scales alone.

    Module.to casts every floating-point tensor, and float8 counts as one. The weight is put back in e4m3
    (exact: every e4m3 value is a bf16, fp16 and float32 value) and the scale is only moved, never cast.
    """

    def _apply(self, fn, recurse=True):
        scale = getattr(self, "weight_scale", None)
        if scale is None:
            return super()._apply(fn, recurse)
        kept = scale.data
        super()._apply(fn, recurse)
        device = self.weight.device
        if self.weight.dtype != FP8:
            self.weight.data = self.weight.data.to(FP8)
        self.weight_scale.data = (torch.empty_like(kept, device=device) if kept.is_meta or device.type == "meta"
                                  else kept.to(device))
        return self

    def make_fp8(self, weight=None, weight_scale=None):
        """Turn this layer's weight into e4m3 + per-row scales in place: quantizes the current weight, or takes
        the given pair (a loader's), or on the meta device only reshapes."""
        if weight is None:
            if self.weight.is_meta:
                weight = torch.empty(self.weight.shape, dtype=FP8, device="meta")
                weight_scale = torch.empty(self.weight.shape[0], dtype=torch.float32, device="meta")
            else:
                weight, weight_scale = quantize_rows(self.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float(), requires_grad=False)
        return self


class Fp8Linear(QuantizableLinear):
    """nn.Linear's interface (weight (out, in), bias (out,)) with an e4m3 weight and float32 `weight_scale`."""

    def __init__(self, in_features, out_features, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        layer = cls(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.make_fp8()

    def forward(self, x):
        return linear(self, x, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


def quantized_layer_paths(num_blocks: int, fp8_skip=()) -> list:
    """Module paths of the layers dit.quantize=fp8 quantizes; block k is transformer_blocks.{k // 2}.{k % 2}, and
    a negative index in fp8_skip counts from the last block (-1: the last)."""
    skip = {k % (2 * num_blocks) for k in fp8_skip}
    return [f"transformer_blocks.{k // 2}.{k % 2}.{name}"
            for k in range(2 * num_blocks) if k not in skip for name in QUANTIZED_LAYERS]


def quantize_dit(model: nn.Module, fp8_skip=()) -> nn.Module:
    """Swap the DiT's big linears (quantized_layer_paths) for Fp8Linear in place; returns the model.

    On a loaded model this quantizes the weights; on a meta-device model it only sets the FP8 shapes, for a
    loader to fill (k4flash/weights.py load_dit, parallel/load.py). Apply before a tensor-parallel plan.
    """
    num_blocks = len(model.transformer_blocks)
    validate_quantize("fp8", fp8_skip, num_blocks)
    for path in quantized_layer_paths(num_blocks, fp8_skip):
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name)))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(p.dtype == FP8 for p in model.parameters())


def fp8_sibling(checkpoint_path) -> Path:
    """`x.pt` / `x.safetensors` → `x.fp8.safetensors`, where `python -m parallel.convert --quantize fp8` writes and
    an FP8 run looks first; a path already ending in .fp8.safetensors is itself."""
    path = Path(checkpoint_path)
    if path.name.endswith(".fp8.safetensors"):
        return path
    return path.with_name(path.stem + ".fp8.safetensors")


def checkpoint_expectation(model_state: dict, file_keys, file_fp8: set):
    """(the keys and shapes a DiT file must have for this model, or None; a one-line problem, or None).

    A quantized model takes an FP8 file (its scales included) or a bf16/fp32 one (quantized while loading, so
    the scales are not expected); a bf16 model cannot take FP8 weights.
    """
    wrong = sorted(k for k in file_fp8 if k in model_state and model_state[k].dtype != FP8)
    if wrong:
        return None, (f"holds FP8 weights ({wrong[0]!r}, written by `python -m parallel.convert --quantize fp8`) "
                      f"where the model built wants {model_state[wrong[0]].dtype}: load it with dit.quantize=fp8 "
                      f"and the dit.fp8_skip it was written with, or use the bf16 checkpoint")
    scales = {k for k in model_state if k.endswith(".weight" + SCALE_SUFFIX)}
    expected = {k: v for k, v in model_state.items()
                if k not in scales or k[:-len(SCALE_SUFFIX)] in file_fp8 or k in file_keys}
    return expected, None


def load_dtype(name: str, model_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter loads in: an FP8 weight stays e4m3, its scale float32, the rest `dtype`."""
    if model_dtype == FP8:
        return FP8
    return torch.float32 if name.endswith(".weight" + SCALE_SUFFIX) else dtype


def tensor_readers(checkpoint, model: nn.Module) -> dict:
    """parameter name → read(rows, cols) of that parameter in the form the model holds it.

    From an FP8 file the weights and scales are read as stored (a rank reads only its slice). From a bf16/fp32
    file an FP8 layer is quantized here: each block of rows is read whole (a row's scale needs all its columns;
    a row-parallel rank then keeps its columns), once for the weight and its scale together.
    """
    readers, memo = {}, {}
    for name, param in model.named_parameters():
        readers[name] = checkpoint.reader(name) if name in checkpoint.shapes else None
        weight_name = name[:-len(SCALE_SUFFIX)] if name.endswith(".weight" + SCALE_SUFFIX) else name
        if param.dtype == FP8 and name not in checkpoint.quantized or readers[name] is None:
            readers[name] = _quantizing_reader(checkpoint.reader(weight_name), weight_name, name != weight_name, memo)
    return readers


def _quantizing_reader(read_weight, weight_name, wants_scale, memo):
    def read(rows, cols):
        key = (weight_name, rows)
        if key not in memo:
            if any(name != weight_name for name, _ in memo):
                memo.clear()  # one layer at a time: its weight, then its scale, ask for the same row blocks
            memo[key] = quantize_rows(read_weight(rows, None))
        q, scale = memo[key]
        if wants_scale:
            return scale
        return q if cols is None else q[:, cols[0]:cols[1]]
    return read
