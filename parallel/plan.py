"""Which plan for which GPUs: one rank's work counted on the meta device, predicted time, and the planner
(docs/parallel.md "Choosing a plan").

`rank_work` runs the real plan code (parallel/tp.py, parallel/sequence.py) for one rank of
a (tp, ulysses, sequence_parallel) plan on the meta device, with the process group replaced
by shape-only stand-ins, and counts that rank's FLOPs, its memory-bound bytes and its
collectives. Two one-pair models give the per-block and the fixed parts, so the published
size costs two tiny meta runs. `predict_plan` turns the counts into seconds with the cost
model (k4flash/cost.py) and adds a per-rank memory estimate; `choose_plan` takes the
fastest plan that fits (`parallel.plan=auto`).
"""
import contextlib
from dataclasses import dataclass

import torch

from k4flash.dit import DiffusionTransformer3D
from k4flash.published import TEXT_TOKENS
from k4flash import cost

from . import comm
from .degrees import allowed_tp_degrees, allowed_ulysses_degrees
from .tp import parallelize_dit


@dataclass(frozen=True)
class Plan:
    tp: int = 1
    ulysses: int = 1
    sequence_parallel: bool = False
    dp: int = 1

    @property
    def group_size(self) -> int:
        return self.tp * self.ulysses

    def __str__(self):
        parts = [f"tp={self.tp}" + ("+sp" if self.sequence_parallel else "")]
        if self.ulysses > 1:
            parts.append(f"ulysses={self.ulysses}")
        if self.dp > 1:
            parts.append(f"dp={self.dp}")
        return " ".join(parts)


class _StandInGroup:
    def __init__(self, size):
        self.size = size


class _StandInDist:
    """What parallel.comm calls on torch.distributed, with no process group: sizes only, data untouched."""
    ReduceOp = torch.distributed.ReduceOp

    @staticmethod
    def get_world_size(group):
        return group.size

    @staticmethod
    def all_reduce(*args, **kwargs):
        pass

    all_to_all_single = all_gather = broadcast = all_reduce


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
def stand_in_collectives():
    """parallel.comm without a process group: every collective keeps its shapes and its counting (STATS)."""
    saved = comm.dist, comm._all_gather_flat, comm._reduce_scatter_flat, comm.PROGRESS.enter
    comm.dist, comm._all_gather_flat, comm._reduce_scatter_flat = _StandInDist, _StandInDist.all_reduce, \
        _StandInDist.all_reduce
    comm.PROGRESS.enter = lambda group: None
    try:
        yield
    finally:
        comm.dist, comm._all_gather_flat, comm._reduce_scatter_flat, comm.PROGRESS.enter = saved


class _UncountedDist:
    """torch.distributed as parallel.comm sees it, with what a collective does inside left out of a count."""

    def __init__(self, dist, work):
        self._dist, self._work = dist, work

    def __getattr__(self, name):
        attr = getattr(self._dist, name)
        return self._work.uncounted(attr) if callable(attr) and not isinstance(attr, type) else attr


@contextlib.contextmanager
def _collectives_uncounted(work):
    saved = comm.dist, comm._all_gather_flat, comm._reduce_scatter_flat
    comm.dist = _UncountedDist(comm.dist, work)
    comm._all_gather_flat, comm._reduce_scatter_flat = work.uncounted(saved[1]), work.uncounted(saved[2])
    try:
        yield
    finally:
        comm.dist, comm._all_gather_flat, comm._reduce_scatter_flat = saved


def measure_rank_work(model, inputs, bytes_per_element=2) -> dict:
    """One forward of `model` (a rank's, or the whole model): FLOPs, memory-bound bytes, collectives (STATS)."""
    counter = cost.flop_counter()
    work = cost.RankWork(bytes_per_element)
    comm.STATS.reset()
    with torch.no_grad(), counter, work, work.attention_region(), _collectives_uncounted(work):
        model(*inputs)
    return dict(flops=counter.get_total_flops(), memory_bytes=work.bytes, calls=dict(comm.STATS.calls),
                comm_bytes=comm.STATS.bytes)


def _one_rank_model(params, plan: Plan, dtype):
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params).to(dtype)
    if plan.group_size > 1:
        parallelize_dit(model, _StandInMesh(plan.ulysses, plan.tp), sequence_parallel=plan.sequence_parallel)
    return model


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
        with torch.device("meta"):
            inputs = (torch.empty(1, *latent_fhw, params["in_visual_dim"], dtype=dtype),
                      torch.empty(1, text_tokens, params["in_text_dim"], dtype=dtype), torch.empty(1))
        with stand_in_collectives(), torch.no_grad():
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


GB = 1e9
COMMUNICATOR_BYTES = 0.5 * GB  # an NCCL communicator's buffers on one GPU (order of magnitude; NCCL_BUFFSIZE etc.)
ALLOCATOR_HEADROOM = 1.10  # caching-allocator fragmentation and workspaces over the live tensors


def rank_memory_bytes(params, plan: Plan, weight_bytes, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                      bytes_per_element=2, text_encoder_resident=True) -> dict:
    """A first-order GPU memory estimate for the busiest rank of a model group (its first: T5 and the VAE too).

    Weights: this rank's DiT shard (counted), T5-XXL if it stays resident, the VAE. Activations: the
    largest set a block holds at once: the residual stream and the normed copy of the rank's tokens,
    the gathered tokens, and the larger of attention's q/k/v (+ their layout copies) and the MLP's hidden
    layer. Communicators: one per group the rank talks in.
    """
    e = bytes_per_element
    S = cost.dit_tokens(params, latent_fhw) + text_tokens
    D, F = params["model_dim"], params["ff_dim"]
    shards = cost.token_shards(S, plan.tp, plan.ulysses, plan.sequence_parallel)
    t, t_u, width = shards["local"], shards["ulysses_shard"], D // plan.group_size
    activations = e * (2 * t * D + t_u * D + max(6 * S * width + 3 * t_u * D // plan.tp, 2 * t_u * F // plan.tp))
    t5 = 2 * cost.t5_encoder_params(**cost.T5_XXL) if text_encoder_resident else 0
    groups = (plan.tp > 1) + (plan.ulysses > 1) + (plan.group_size > 1 and plan.tp > 1 and plan.ulysses > 1)
    parts = dict(dit_weights=weight_bytes, text_encoder=t5, vae=cost.VAE_PARAMS * e, activations=activations,
                 communicators=groups * COMMUNICATOR_BYTES)
    parts["total"] = sum(parts.values()) * ALLOCATOR_HEADROOM
    return parts


def candidate_plans(params: dict, world: int) -> list:
    """Every plan the DiT allows on `world` GPUs: ulysses · tp dividing world, whole heads per rank."""
    plans = []
    for tp in allowed_tp_degrees(params, limit=world):
        for ulysses in allowed_ulysses_degrees(params, tp, limit=world // tp):
            if world % (tp * ulysses):
                continue
            for sp in ((False, True) if tp > 1 else (False,)):
                plans.append(Plan(tp, ulysses, sp, world // (tp * ulysses)))
    return plans


def predict_plan(params, plan: Plan, gpu=cost.H100_SXM, mfu=0.5, latent_fhw=cost.PUBLISHED_LATENT,
                 text_tokens=TEXT_TOKENS, fused=False, vae=None) -> dict:
    """Seconds per stage and GPU memory per rank of one video under `plan` (see cost.predict)."""
    work = rank_work(params, plan, latent_fhw, text_tokens)
    memory_bytes = cost.dit_fused_bytes(params, plan.tp, plan.ulysses, plan.sequence_parallel, latent_fhw,
                                        text_tokens) if fused else work["memory_bytes"]
    vae = vae or cost.scaled_vae_counts(latent_fhw)
    pred = cost.predict(params, gpu, tp=plan.tp, mfu=mfu, latent_fhw=latent_fhw, text_tokens=text_tokens, vae=vae,
                        vae_ranks=plan.group_size, ulysses=plan.ulysses, sequence_parallel=plan.sequence_parallel,
                        rank_flops=work["flops"], rank_memory_bytes=memory_bytes)
    memory = rank_memory_bytes(params, plan, work["weight_bytes"], latent_fhw, text_tokens)
    return dict(pred, plan=str(plan), dp=plan.dp, rank_flops=work["flops"], rank_memory_bound_bytes=memory_bytes,
                gpu_memory_gb=memory["total"] / GB, memory=memory)


def choose_plan(params, world: int, gpu_memory_gb: float, gpu=cost.H100_SXM, mfu=0.5,
                latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, fused=False, allowed=None):
    """(the fastest plan for one video that fits in gpu_memory_gb per GPU, every candidate's prediction).

    allowed(plan) -> bool narrows the candidates (the degrees a user gave). Ties (within 1 %) go to
    fewer data-parallel groups, then to TP without Ulysses, then without sequence parallelism: the
    product's default. Raises ValueError, naming the smallest need, when nothing fits.
    """
    plans = [plan for plan in candidate_plans(params, world) if allowed is None or allowed(plan)]
    if not plans:
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) agrees with the degrees given")
    rows = [predict_plan(params, plan, gpu, mfu, latent_fhw, text_tokens, fused) for plan in plans]
    for row, plan in zip(rows, plans):
        row["fits"] = row["gpu_memory_gb"] <= gpu_memory_gb
        row["plan_object"] = plan
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        need = min(r["gpu_memory_gb"] for r in rows)
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) fits {gpu_memory_gb:g} GB per GPU "
                         f"(the smallest needs {need:.1f} GB); use more GPUs")
    best = min(r["end_to_end_s"] for r in fitting)
    close = [r for r in fitting if r["end_to_end_s"] <= best * 1.01]
    chosen = min(close, key=lambda r: (r["plan_object"].dp, r["plan_object"].ulysses > 1,
                                       r["plan_object"].sequence_parallel, r["end_to_end_s"]))
    return chosen["plan_object"], rows
