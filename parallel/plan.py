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
from k4flash.geometry import TEXT_ENCODER_OFFLOADS
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


@_memoized
def rank_activation_peak(params: dict, plan: Plan, latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                         dtype=torch.bfloat16) -> int:
    """Peak bytes of one rank's DiT activations in a forward (cost.LivePeak on the meta device).

    The blocks run one after another, so one block pair shows the peak; the rank's input latents and
    text embedding are not counted (the sampler holds them anyway); attention is the fused kernel's
    (`_flash_attention_memory`).
    """
    model = _one_rank_model(dict(params, num_blocks=1), plan, dtype)
    with torch.device("meta"):
        inputs = (torch.empty(1, *latent_fhw, params["in_visual_dim"], dtype=dtype),
                  torch.empty(1, text_tokens, params["in_text_dim"], dtype=dtype), torch.empty(1))
    tracker = cost.LivePeak()
    with stand_in_collectives(), _flash_attention_memory(), torch.no_grad():
        model(*inputs)  # the RoPE and frequency tables: built once per geometry, then held (counted below as live)
        with tracker:
            model(*inputs)
    return tracker.peak


@contextlib.contextmanager
def _flash_attention_memory():
    """Joint attention as the GPU runs it: a fused kernel that keeps its output (and per-row statistics), never
    the S x S scores (on the meta device SDPA would take the math path and hold them)."""
    from k4flash import dit

    original = dit.joint_attention
    dit.joint_attention = lambda q, k, v: torch.empty_like(q)  # (B, heads, S, head_dim)
    try:
        yield
    finally:
        dit.joint_attention = original


GB = 1e9
COMMUNICATOR_BYTES = 0.5 * GB  # an NCCL communicator's buffers on one GPU (order of magnitude; NCCL_BUFFSIZE etc.)
CUDA_CONTEXT_BYTES = 0.5 * GB  # the CUDA context and kernels each process holds on its GPU, outside torch's allocator
ALLOCATOR_HEADROOM = 1.10  # caching-allocator fragmentation and workspaces over the live tensors
OFFLOADS = TEXT_ENCODER_OFFLOADS  # in order of preference: keeping T5 costs nothing per prompt
T5_STREAM_BLOCKS = 2  # text_encoder.offload=cpu: the block running and the next one, prefetched


def rank_memory(params, plan: Plan, offload="none", latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                bytes_per_element=2, vae_parallel=True, group_main=True, device="cuda", weight_bytes=None,
                loads_vae=True, t5=None) -> dict:
    """Memory one rank needs, per stage of a generation, and its peak (bytes).

    Stages: `encode` (T5 at work), `denoise` (the DiT), `decode` (the VAE, on a band of 1/(ulysses·tp) of
    the rows with vae.parallel). What is resident in each depends on the rank (the group's first runs T5)
    and `offload`: none keeps T5 loaded; after_encode loads T5 first, encodes, frees it, then loads the
    DiT; cpu keeps T5 in host memory and streams T5_STREAM_BLOCKS blocks at a time. Each stage is its
    resident weights plus the stage's activations (counted on the meta device: rank_activation_peak,
    cost.VAE_DECODE_PEAK), times ALLOCATOR_HEADROOM; on a GPU each process adds its CUDA context and one
    communicator per group it talks in. `device="cpu"`: host memory of a CPU run (no context, no
    communicators, no headroom; T5 is where it runs). loads_vae=False leaves the VAE out (python -m
    bench.memory); t5: the encoder's config (default T5-XXL, cost.T5_XXL).
    """
    e = bytes_per_element
    t5 = t5 or cost.T5_XXL
    if weight_bytes is None:
        weight_bytes = rank_work(params, plan, latent_fhw, text_tokens)["weight_bytes"] * e // 2
    dit = weight_bytes
    vae = cost.VAE_PARAMS * e if loads_vae and (group_main or (vae_parallel and plan.group_size > 1)) else 0
    t5_whole = cost.t5_encoder_params(**t5) * e if group_main else 0
    t5_acts = text_tokens * (6 * t5["d_model"] + 2 * t5["d_ff"]) * e \
        + t5["num_heads"] * text_tokens ** 2 * 4 if group_main else 0  # hidden states, MLP, fp32 scores
    if offload == "cpu" and device == "cuda":
        t5_at_work, t5_resident = T5_STREAM_BLOCKS * cost.t5_block_params(**t5) * e if group_main else 0, 0
    elif offload == "none" or (offload == "cpu" and device == "cpu"):
        t5_at_work = t5_resident = t5_whole
    elif offload == "after_encode":
        t5_at_work, t5_resident = t5_whole, 0
    else:
        raise ValueError(f"text_encoder.offload={offload!r}: allowed values are {list(OFFLOADS)}")
    dit_acts = rank_activation_peak(params, plan, latent_fhw, text_tokens,
                                    torch.bfloat16 if e == 2 else torch.float32)
    bands = plan.group_size if vae_parallel else 1
    vae_acts = cost.scaled_vae_decode_peak(latent_fhw, bands, e) if vae else 0
    dit_during_encode = 0 if offload == "after_encode" else dit  # after_encode: the DiT loads once T5 is gone
    stages = {"encode": dit_during_encode + t5_at_work + vae + t5_acts,
              "denoise": dit + t5_resident + vae + dit_acts,
              "decode": dit + t5_resident + vae + vae_acts}
    fixed, headroom = 0, 1.0
    if device == "cuda":
        groups = (plan.tp > 1) + (plan.ulysses > 1) + (plan.tp > 1 and plan.ulysses > 1)
        fixed, headroom = CUDA_CONTEXT_BYTES + groups * COMMUNICATOR_BYTES, ALLOCATOR_HEADROOM
    stages = {name: bytes_ * headroom + fixed for name, bytes_ in stages.items()}
    stage = max(stages, key=stages.get)
    return dict(stages=stages, peak=stages[stage], peak_stage=stage, dit_weights=dit, text_encoder=t5_resident,
                vae=vae, dit_activations=dit_acts, vae_activations=vae_acts, fixed=fixed)


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
                 text_tokens=TEXT_TOKENS, fused=False, vae=None, offload="none") -> dict:
    """Seconds per stage and GPU memory of the busiest rank (a group's first) for one video under `plan`.

    offload=cpu adds streaming T5's weights over PCIe (PCIE_BYTES_PER_S) to every prompt's encode.
    """
    work = rank_work(params, plan, latent_fhw, text_tokens)
    memory_bytes = cost.dit_fused_bytes(params, plan.tp, plan.ulysses, plan.sequence_parallel, latent_fhw,
                                        text_tokens) if fused else work["memory_bytes"]
    vae = vae or cost.scaled_vae_counts(latent_fhw)
    pred = cost.predict(params, gpu, tp=plan.tp, mfu=mfu, latent_fhw=latent_fhw, text_tokens=text_tokens, vae=vae,
                        vae_ranks=plan.group_size, ulysses=plan.ulysses, sequence_parallel=plan.sequence_parallel,
                        rank_flops=work["flops"], rank_memory_bytes=memory_bytes)
    if offload == "cpu":
        stream_s = 2 * cost.t5_encoder_params(**cost.T5_XXL) / PCIE_BYTES_PER_S
        pred = dict(pred, t5_s=pred["t5_s"] + stream_s, end_to_end_s=pred["end_to_end_s"] + stream_s)
    memory = rank_memory(params, plan, offload, latent_fhw, text_tokens, weight_bytes=work["weight_bytes"])
    return dict(pred, plan=str(plan), dp=plan.dp, offload=offload, rank_flops=work["flops"],
                rank_memory_bound_bytes=memory_bytes, gpu_memory_gb=memory["peak"] / GB, memory=memory)


PCIE_BYTES_PER_S = 25e9  # host → GPU, PCIe 5 x16 in practice (pinned memory)


def choose_plan(params, world: int, gpu_memory_gb: float, gpu=cost.H100_SXM, mfu=0.5,
                latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, fused=False, allowed=None,
                offloads=OFFLOADS):
    """(the fastest (plan, offload) for one video that fits in gpu_memory_gb per GPU, every candidate's prediction).

    allowed(plan) -> bool narrows the plans (the degrees a user gave), `offloads` the text-encoder
    settings. Ties (within 1 %) go to fewer data-parallel groups, then to TP without Ulysses, then
    without sequence parallelism, then to keeping T5 (none, after_encode, cpu): the product's default.
    Raises ValueError, naming the smallest need, when nothing fits.
    """
    plans = [plan for plan in candidate_plans(params, world) if allowed is None or allowed(plan)]
    if not plans:
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) agrees with the degrees given")
    rows = []
    for plan in plans:
        for offload in offloads:
            row = predict_plan(params, plan, gpu, mfu, latent_fhw, text_tokens, fused, offload=offload)
            row.update(fits=row["gpu_memory_gb"] <= gpu_memory_gb, plan_object=plan)
            rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        need = min(r["gpu_memory_gb"] for r in rows)
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) fits {gpu_memory_gb:g} GB per GPU "
                         f"(the smallest needs {need:.1f} GB); use more GPUs")
    best = min(r["end_to_end_s"] for r in fitting)
    close = [r for r in fitting if r["end_to_end_s"] <= best * 1.01]
    chosen = min(close, key=lambda r: (r["plan_object"].dp, r["plan_object"].ulysses > 1,
                                       r["plan_object"].sequence_parallel, OFFLOADS.index(r["offload"]),
                                       r["end_to_end_s"]))
    return chosen["plan_object"], chosen["offload"], rows
