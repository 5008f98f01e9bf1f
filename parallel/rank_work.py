"""One rank's work under a plan, counted on the meta device (docs/parallel.md "Choosing a plan").

`rank_work` runs the real plan code (parallel/tp.py, parallel/sequence.py) for one rank of a
(tp, ulysses, sequence_parallel) plan on the meta device, with parallel.comm's backend replaced
by a shape-only stand-in, and counts that rank's FLOPs, its memory-bound bytes and its
collectives. Two one-pair models give the per-block and the fixed parts, so the published size
costs two tiny meta runs. `measure_rank_work` is the counting itself, also run on real ranks
(python -m bench.tp). Both swap the DiT's `attention` seam for the duration (k4flash/dit.py):
attention is one fused kernel on a GPU, so it is compute, not memory-bound traffic.
"""
import contextlib

import torch

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
    """One forward of `model` (a rank's, or the whole model): FLOPs, memory-bound bytes, collectives (STATS)."""
    counter = flop_counter()
    work = RankWork(bytes_per_element)
    comm.STATS.reset()
    with torch.no_grad(), counter, work, swapped_attention(model, work.uncounted(model.attention)), \
            comm.use_backend(_UncountedCollectives(comm.backend(), work)):
        model(*inputs)
    return dict(flops=counter.get_total_flops(), memory_bytes=work.bytes, calls=dict(comm.STATS.calls),
                comm_bytes=comm.STATS.bytes)


def _one_rank_model(params, plan: Plan, dtype):
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params).to(dtype)
    if plan.group_size > 1:
        parallelize_dit(model, _StandInMesh(plan.ulysses, plan.tp), sequence_parallel=plan.sequence_parallel)
    return model


def _meta_inputs(params, latent_fhw, text_tokens, dtype):
    with torch.device("meta"):
        return (torch.empty(1, *latent_fhw, params["in_visual_dim"], dtype=dtype),
                torch.empty(1, text_tokens, params["in_text_dim"], dtype=dtype), torch.empty(1))


def _memoized(fn):
    """fn(params, plan, latent, text, dtype) cached by value: the planner asks for the same counts many times."""
    cache = {}

    def call(params, plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, dtype=torch.bfloat16):
        key = (tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items())),
               plan, tuple(latent_fhw), text_tokens, dtype)
        if key not in cache:
            cache[key] = fn(params, plan, latent_fhw, text_tokens, dtype)
        return cache[key]
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


@_memoized
def rank_work(params: dict, plan: Plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
              dtype=torch.bfloat16) -> dict:
    """One rank's FLOPs, memory-bound bytes, weight bytes and collectives for one DiT forward, on meta.

    dtype: of the weights and activations (bf16 as on a GPU: its float32 RoPE and time-embedding
    copies are counted; float32 as the CPU runs). Bytes are at dtype's size.
    """
    counts = []
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    for num_blocks in (1, 2):  # one pair of blocks, then two: the difference is one pair's work
        model = _one_rank_model(dict(params, num_blocks=num_blocks), plan, dtype)
        inputs = _meta_inputs(params, latent_fhw, text_tokens, dtype)
        with comm.use_backend(ShapeOnlyCollectives()), torch.no_grad():
            model(*inputs)  # the RoPE and time-frequency tables are built once per geometry: not per forward
            counts.append(measure_rank_work(model, inputs, bytes_per_element))
        counts[-1]["weight_elements"] = sum(p.numel() for p in model.parameters())
    one, two = counts
    scale = params["num_blocks"] - 1  # pairs beyond the first

    def extrapolate(key):
        return one[key] + scale * (two[key] - one[key])
    return dict(flops=extrapolate("flops"), memory_bytes=extrapolate("memory_bytes"),
                weight_bytes=extrapolate("weight_elements") * bytes_per_element,
                calls={op: one["calls"].get(op, 0) + scale * (two["calls"].get(op, 0) - one["calls"].get(op, 0))
                       for op in set(one["calls"]) | set(two["calls"])},
                comm_bytes=extrapolate("comm_bytes"))


def _fused_attention(q, k, v):
    """Joint attention as the GPU runs it, for a memory count: a fused kernel that keeps its output (and per-row
    statistics), never the S x S scores (on the meta device SDPA would take the math path and hold them)."""
    return torch.empty_like(q)  # (B, heads, S, head_dim)


@_memoized
def rank_activation_peak(params: dict, plan: Plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                         dtype=torch.bfloat16) -> int:
    """Peak bytes of one rank's DiT activations in a forward (counting.LivePeak on the meta device).

    The blocks run one after another, so one block pair shows the peak; the rank's input latents and
    text embedding are not counted (the sampler holds them anyway); attention is the fused kernel's
    (`_fused_attention`).
    """
    model = _one_rank_model(dict(params, num_blocks=1), plan, dtype)
    inputs = _meta_inputs(params, latent_fhw, text_tokens, dtype)
    tracker = LivePeak()
    with comm.use_backend(ShapeOnlyCollectives()), swapped_attention(model, _fused_attention), torch.no_grad():
        model(*inputs)  # the RoPE and frequency tables: built once per geometry, then held (counted below as live)
        with tracker:
            model(*inputs)
    return tracker.peak
