"""One rank's work under a plan, counted on the meta device (docs/parallel.md "Choosing a plan").

`rank_work` runs the real plan code (parallel/tp.py, parallel/sequence.py) for one rank of a
(tp, ulysses, sequence_parallel) plan on the meta device, with parallel.comm's backend replaced
by a shape-only stand-in, and counts that rank's FLOPs, its memory-bound bytes and its
collectives. Two one-pair models give the per-block and the fixed parts, so the published size
costs two tiny meta runs (three with dit.quantize=fp8: one FP8 pair gives what quantizing a block changes).
`measure_rank_work` is the counting itself, also run on real ranks (python -m bench.tp). Both swap the
DiT's `attention` seam for the duration (k4flash/dit.py): attention is one fused kernel on a GPU, so it
is compute, not memory-bound traffic.
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from k4flash import fp8
from k4flash.dit import DiffusionTransformer3D
from k4flash.published import TEXT_TOKENS

from . import comm, cost
from .counting import LivePeak, RankWork, flop_counter
from .plan import Plan
from .tp import parallelize_dit


class _StandInGroup:
    def __init__(self, size):
        self.size = size


class ShapeOnlyCollectives:
    """parallel.comm's backend with no process group: a group is its size, and every collective leaves its
    buffers as they are (their shapes are all a count needs)."""

    def size(self, group) -> int:
        return group.size

    def rank(self) -> int:
        return 0

    def global_rank(self, group, index: int) -> int:
        return index

    def group_key(self, group):
        return None  # no heartbeat watches a stand-in group

    def all_reduce(self, tensor, group):
        pass

    def all_gather(self, parts, tensor, group):
        pass

    def all_gather_into(self, out, tensor, group):
        pass

    def reduce_scatter_into(self, out, tensor, group):
        pass

    def all_to_all(self, out, tensor, group):
        pass

    def broadcast(self, tensor, src, group):
        pass

    def gather(self, tensor, parts, dst, group):
        pass


class _UncountedCollectives:
    """A backend whose calls `work` leaves out of its count: gloo copies buffers inside a collective (NCCL does
    not), and those copies are communication, not the rank's memory-bound work."""

    def __init__(self, collectives, work: RankWork):
        self._collectives, self._work = collectives, work

    def __getattr__(self, name):
        attr = getattr(self._collectives, name)
        return self._work.uncounted(attr) if callable(attr) else attr


class _MeshDim:
    def __init__(self, size):
        self.group, self._size = _StandInGroup(size), size

    def get_group(self):
        return self.group

    def get_local_rank(self):
        return 0

    def size(self):
        return self._size


class _StandInMesh:
    """A ("ulysses", "tp") mesh seen from rank 0 of its group."""
    ndim, mesh_dim_names = 2, ("ulysses", "tp")

    def __init__(self, ulysses, tp):
        self.dims = {"ulysses": _MeshDim(ulysses), "tp": _MeshDim(tp)}

    def __getitem__(self, name):
        return self.dims[name]


@contextlib.contextmanager
def swapped_attention(model, attention):
    """The DiT's `attention` seam set to `attention` for the duration."""
    saved, model.attention = model.attention, attention
    try:
        yield model
    finally:
        model.attention = saved


def measure_rank_work(model, inputs, bytes_per_element=2) -> dict:
    """One forward of `model` (a rank's, or the whole model): FLOPs (fp8_flops: those of FP8 matmuls),
    memory-bound bytes, collectives (STATS)."""
    counter = flop_counter()
    # An FP8 matmul's input quantization (k4flash/fp8.py quantize_rows: |max| per token in float32, a float32
    # block divided and clamped, the e4m3 write) counted at its tensors' own sizes.
    work = RankWork(bytes_per_element, exact=(fp8.quantize_rows,))
    comm.STATS.reset()
    with torch.no_grad(), counter, work, swapped_attention(model, work.uncounted(model.attention)), \
            comm.use_backend(_UncountedCollectives(comm.backend(), work)):
        model(*inputs)
    by_op = counter.get_flop_counts()["Global"]
    return dict(flops=counter.get_total_flops(), fp8_flops=by_op.get(torch.ops.aten._scaled_mm, 0),
                memory_bytes=work.bytes, fp8_input_elements=work.fp8_input_elements, calls=dict(comm.STATS.calls),
                comm_bytes=comm.STATS.bytes)


def _one_rank_model(params, plan: Plan, dtype, quantized=False):
    """One rank's DiT of `params` on meta in `dtype`, every block's big linears FP8 when `quantized`."""
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params).to(dtype)
    if quantized:
        fp8.quantize_dit(model)
    if plan.group_size > 1:
        parallelize_dit(model, _StandInMesh(plan.ulysses, plan.tp), sequence_parallel=plan.sequence_parallel)
    return model


def _meta_inputs(params, latent_fhw, text_tokens, dtype):
    with torch.device("meta"):
        return (torch.empty(1, *latent_fhw, params["in_visual_dim"], dtype=dtype),
                torch.empty(1, text_tokens, params["in_text_dim"], dtype=dtype), torch.empty(1))


def _memoized(fn):
    """fn(params, plan, latent, text, dtype, **options) cached by value: the planner asks for the same counts many
    times."""
    cache = {}

    def frozen(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    def call(params, plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, dtype=torch.bfloat16,
             **options):
        key = (tuple(sorted((k, frozen(v)) for k, v in params.items())), plan, tuple(latent_fhw), text_tokens, dtype,
               tuple(sorted((k, frozen(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = fn(params, plan, latent_fhw, text_tokens, dtype, **options)
        return cache[key]
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


def quantized_blocks(params: dict, quantize="none", fp8_skip=()) -> int:
    """How many of the DiT's 2·num_blocks transformer blocks dit.quantize / dit.fp8_skip make FP8."""
    if quantize == "none":
        return 0
    return len(fp8.quantized_layer_paths(params["num_blocks"], fp8_skip)) // len(fp8.QUANTIZED_LAYERS)


def _count_pair_model(params, plan, latent_fhw, text_tokens, dtype, num_blocks, quantized=False) -> dict:
    model = _one_rank_model(dict(params, num_blocks=num_blocks), plan, dtype, quantized)
    inputs = _meta_inputs(params, latent_fhw, text_tokens, dtype)
    with comm.use_backend(ShapeOnlyCollectives()), torch.no_grad():
        model(*inputs)  # the RoPE and time-frequency tables are built once per geometry: not per forward
        counts = measure_rank_work(model, inputs, torch.empty((), dtype=dtype).element_size())
    counts["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return counts


@_memoized
def rank_work(params: dict, plan: Plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
              dtype=torch.bfloat16, quantize="none", fp8_skip=()) -> dict:
    """One rank's FLOPs, memory-bound bytes, weight bytes and collectives for one DiT forward, on meta.

    dtype: of the weights and activations (bf16 as on a GPU: its float32 RoPE and time-embedding
    copies are counted; float32 as the CPU runs). Bytes are at dtype's size, but for the FP8 parts at their
    own: weights as the parameters are (e4m3, float32 scales), the input quantization's float32 copies.
    quantize="fp8": the blocks but fp8_skip FP8 (k4flash/fp8.py); fp8_flops are the FLOPs of their matmuls,
    fp8_input_elements what those matmuls take in (each quantized per token first).
    The two blocks of a pair are alike, so a quantized block changes the counts by half of what quantizing
    the one-pair model does.
    """
    one, two = (_count_pair_model(params, plan, latent_fhw, text_tokens, dtype, n) for n in (1, 2))
    scale = params["num_blocks"] - 1  # pairs beyond the first
    keys = ("flops", "fp8_flops", "memory_bytes", "fp8_input_elements", "weight_bytes", "comm_bytes")
    out = {key: one[key] + scale * (two[key] - one[key]) for key in keys}
    out["calls"] = {op: one["calls"].get(op, 0) + scale * (two["calls"].get(op, 0) - one["calls"].get(op, 0))
                    for op in set(one["calls"]) | set(two["calls"])}
    blocks = quantized_blocks(params, quantize, fp8_skip)
    if blocks:
        pair = _count_pair_model(params, plan, latent_fhw, text_tokens, dtype, 1, quantized=True)
        for key in keys:
            assert (pair[key] - one[key]) % 2 == 0, key  # two alike blocks
            out[key] += blocks * (pair[key] - one[key]) // 2
    return dict(out, quantized_blocks=blocks)


def _fused_attention(q, k, v):
    """Joint attention as the GPU runs it, for a memory count: a fused kernel that keeps its output (and per-row
    statistics), never the S x S scores (on the meta device SDPA would take the math path and hold them)."""
    return torch.empty_like(q)  # (B, heads, S, head_dim)


def _cpu_scaled_mm(mat_a, mat_b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, **_):
    """torch._scaled_mm with row-wise scales as PyTorch's CPU kernel computes it (Blas.cpp
    _scaled_mm_out_cpu_emulated): both operands made contiguous and copied to float32 times their scales, a
    float32 matmul, cast to out_dtype. Run on meta, it allocates what the CPU kernel allocates inside; a GPU's
    FP8 kernel only writes the output."""
    out = torch.empty(mat_a.shape[0], mat_b.shape[1], dtype=out_dtype or torch.bfloat16, device=mat_a.device)
    a, b = mat_a.contiguous(), mat_b.contiguous()
    fp32_a = a.float() * scale_a
    fp32_b = b.float() * scale_b
    result = fp32_a @ fp32_b
    if bias is not None:
        result.add_(bias)
    result = result.to(out.dtype)
    out.copy_(result)
    return out


class _CpuFp8Matmul(TorchDispatchMode):
    """Runs every aten._scaled_mm as `_cpu_scaled_mm`, whose ops the modes entered before this one (LivePeak) see."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._scaled_mm:
            return _cpu_scaled_mm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@_memoized
def rank_activation_peak(params: dict, plan: Plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                         dtype=torch.bfloat16, quantized=False, cpu_kernels=False) -> int:
    """Peak bytes of one rank's DiT activations in a forward (counting.LivePeak on the meta device).

    The blocks run one after another, so one block pair shows the peak; the rank's input latents and
    text embedding are not counted (the sampler holds them anyway); attention is the fused kernel's
    (`_fused_attention`). quantized: the pair's big linears FP8, so their input quantization's float32
    copies and e4m3 copy count (k4flash/fp8.py fp8_linear); a model with some blocks kept in bf16 peaks at
    the larger of the two counts. cpu_kernels: the FP8 matmul as the CPU runs it (`_cpu_scaled_mm`: float32
    copies of the weight and the input), for a CPU run's host memory.
    """
    model = _one_rank_model(dict(params, num_blocks=1), plan, dtype, quantized)
    inputs = _meta_inputs(params, latent_fhw, text_tokens, dtype)
    tracker = LivePeak()
    with comm.use_backend(ShapeOnlyCollectives()), swapped_attention(model, _fused_attention), torch.no_grad():
        model(*inputs)  # the RoPE and frequency tables: built once per geometry, then held (counted below as live)
        with tracker, _CpuFp8Matmul() if quantized and cpu_kernels else contextlib.nullcontext():
            model(*inputs)
    return tracker.peak
