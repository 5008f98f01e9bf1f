"""Which plan for which GPUs: predicted time and memory per rank, and the planner behind `parallel.plan=auto`
(docs/parallel.md "Choosing a plan").

`predict_plan` turns one rank's counted work (parallel/rank_work.py) into seconds with the
cost model (parallel/cost.py) and adds a per-rank memory estimate (`rank_memory`);
`choose_plan` takes the fastest plan that fits.
"""
import torch

from k4flash.geometry import TEXT_ENCODER_OFFLOADS
from k4flash.published import TEXT_TOKENS

from . import cost
from .plan import Plan, candidate_plans
from .rank_work import rank_activation_peak, rank_work

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
