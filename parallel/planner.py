"""Which plan for which GPUs: predicted time and memory per rank, and the planner behind `parallel.plan=auto`
(docs/parallel.md "Choosing a plan").

`predict_plan` turns one rank's counted work (parallel/rank_work.py) into seconds with the
cost model (parallel/cost.py) and adds a per-rank memory estimate (`rank_memory`);
`choose_plan` takes the fastest plan, text-encoder offload and DiT offload that fit, with
dit.quantize as configured (FP8 changes the video: never switched on here).
"""
import torch

from k4flash.geometry import DIT_OFFLOADS, TEXT_ENCODER_OFFLOADS
from k4flash.published import TEXT_TOKENS

from . import cost
from .plan import Plan, candidate_plans
from .rank_work import quantized_blocks, rank_activation_peak, rank_work

GB = 1e9
COMMUNICATOR_BYTES = 0.5 * GB  # an NCCL communicator's buffers on one GPU (order of magnitude; NCCL_BUFFSIZE etc.)
CUDA_CONTEXT_BYTES = 0.5 * GB  # the CUDA context and kernels each process holds on its GPU, outside torch's allocator
ALLOCATOR_HEADROOM = 1.10  # caching-allocator fragmentation and workspaces over the live tensors
OFFLOADS = TEXT_ENCODER_OFFLOADS  # in order of preference: keeping T5 costs nothing per prompt
# DIT_OFFLOADS (dit.offload), in order of preference too: none, during_decode (a batch copies the DiT out and back)
T5_STREAM_BLOCKS = 2  # text_encoder.offload=cpu: the block running and the next one, prefetched


def rank_memory(params, plan: Plan, offload="none", latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS,
                bytes_per_element=2, vae_parallel=True, group_main=True, device="cuda", weight_bytes=None,
                loads_vae=True, t5=None, quantize="none", fp8_skip=(), dit_offload="none") -> dict:
    """Memory one rank needs, per stage of a generation, and its peak (bytes).

    Stages: `encode` (T5 at work), `denoise` (the DiT), `decode` (the VAE, on a band of 1/(ulysses·tp) of
    the rows with vae.parallel). What is resident in each depends on the rank (the group's first runs T5)
    and `offload`: none keeps T5 loaded; after_encode loads T5 first, encodes, frees it, then loads the
    DiT; cpu keeps T5 in host memory and streams T5_STREAM_BLOCKS blocks at a time. dit_offload=
    during_decode: the DiT's weights leave the GPU before the decode (freed, or in host memory: not counted
    here). quantize="fp8": the DiT's weights as the quantized model holds them (e4m3 and float32 scales for
    the blocks but fp8_skip, counted on meta) and its activations with the FP8 matmuls' input copies (and, on
    device="cpu", the float32 operand copies of PyTorch's CPU FP8 matmul). Each
    stage is its resident weights plus the stage's activations (counted on the meta device:
    rank_activation_peak, cost.VAE_DECODE_PEAK), times ALLOCATOR_HEADROOM; on a GPU each process adds its
    CUDA context and one communicator per group it talks in. `device="cpu"`: host memory of a CPU run (no
    context, no communicators, no headroom; T5 is where it runs). loads_vae=False leaves the VAE out
    (python -m bench.memory); t5: the encoder's config (default T5-XXL, cost.T5_XXL).
    """
    e = bytes_per_element
    t5 = t5 or cost.T5_XXL
    if dit_offload not in DIT_OFFLOADS:
        raise ValueError(f"dit.offload={dit_offload!r}: allowed values are {list(DIT_OFFLOADS)}")
    dtype = torch.bfloat16 if e == 2 else torch.float32
    quantized = quantized_blocks(params, quantize, fp8_skip) > 0
    if weight_bytes is None:
        weight_bytes = rank_work(params, plan, latent_fhw, text_tokens, dtype, quantize=quantize,
                                 fp8_skip=tuple(fp8_skip))["weight_bytes"]
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
    dit_acts = rank_activation_peak(params, plan, latent_fhw, text_tokens, dtype)
    if quantized:  # a bf16 block kept by fp8_skip may peak higher than an FP8 one: the larger
        dit_acts = max(dit_acts, rank_activation_peak(params, plan, latent_fhw, text_tokens, dtype, quantized=True,
                                                      cpu_kernels=device == "cpu"))
    bands = plan.group_size if vae_parallel else 1
    vae_acts = cost.scaled_vae_decode_peak(latent_fhw, bands, e) if vae else 0
    dit_during_encode = 0 if offload == "after_encode" else dit  # after_encode: the DiT loads once T5 is gone
    dit_during_decode = 0 if dit_offload == "during_decode" else dit
    stages = {"encode": dit_during_encode + t5_at_work + vae + t5_acts,
              "denoise": dit + t5_resident + vae + dit_acts,
              "decode": dit_during_decode + t5_resident + vae + vae_acts}
    fixed, headroom = 0, 1.0
    if device == "cuda":
        groups = (plan.tp > 1) + (plan.ulysses > 1) + (plan.tp > 1 and plan.ulysses > 1)
        fixed, headroom = CUDA_CONTEXT_BYTES + groups * COMMUNICATOR_BYTES, ALLOCATOR_HEADROOM
    stages = {name: bytes_ * headroom + fixed for name, bytes_ in stages.items()}
    stage = max(stages, key=stages.get)
    return dict(stages=stages, peak=stages[stage], peak_stage=stage, dit_weights=dit, text_encoder=t5_resident,
                vae=vae, dit_activations=dit_acts, vae_activations=vae_acts, fixed=fixed, quantize=quantize,
                dit_offload=dit_offload)


def predict_plan(params, plan: Plan, gpu=cost.H100_SXM, mfu=0.5, latent_fhw=cost.PUBLISHED_LATENT,
                 text_tokens=TEXT_TOKENS, fused=False, vae=None, offload="none", quantize="none", fp8_skip=(),
                 dit_offload="none", dit_reload=True) -> dict:
    """Seconds per stage and GPU memory of the busiest rank (a group's first) for one video under `plan`.

    offload=cpu adds streaming T5's weights over PCIe (gpu.pcie_bytes_per_s) to every prompt's encode.
    quantize="fp8": the FP8 matmuls' FLOPs at the FP8 peak and the input quantization's traffic at HBM speed
    (eager: counted; fused: cost.FP8_FUSED_QUANTIZE_BYTES per input element). dit_offload=during_decode with
    dit_reload (a batch or a server: the DiT is needed again) adds the DiT's weights copied to host memory
    and back over PCIe to every video (`dit_offload_s`, overlapping nothing); a one-video run frees them
    (dit_reload=False: no copy).
    """
    fp8_skip = tuple(fp8_skip)
    work = rank_work(params, plan, latent_fhw, text_tokens, quantize=quantize, fp8_skip=fp8_skip)
    memory_bytes = work["memory_bytes"]
    if fused:
        memory_bytes = cost.dit_fused_bytes(params, plan.tp, plan.ulysses, plan.sequence_parallel, latent_fhw,
                                            text_tokens) + work["fp8_input_elements"] * cost.FP8_FUSED_QUANTIZE_BYTES
    vae = vae or cost.scaled_vae_counts(latent_fhw)
    pred = cost.predict(params, gpu, tp=plan.tp, mfu=mfu, latent_fhw=latent_fhw, text_tokens=text_tokens, vae=vae,
                        vae_ranks=plan.group_size, ulysses=plan.ulysses, sequence_parallel=plan.sequence_parallel,
                        rank_flops=work["flops"], rank_memory_bytes=memory_bytes, rank_fp8_flops=work["fp8_flops"])
    if offload == "cpu":
        stream_s = 2 * cost.t5_encoder_params(**cost.T5_XXL) / gpu.pcie_bytes_per_s
        pred = dict(pred, t5_s=pred["t5_s"] + stream_s, end_to_end_s=pred["end_to_end_s"] + stream_s)
    memory = rank_memory(params, plan, offload, latent_fhw, text_tokens, weight_bytes=work["weight_bytes"],
                         quantize=quantize, fp8_skip=fp8_skip, dit_offload=dit_offload)
    copy_s = 2 * work["weight_bytes"] / gpu.pcie_bytes_per_s if dit_offload == "during_decode" and dit_reload else 0.0
    return dict(pred, end_to_end_s=pred["end_to_end_s"] + copy_s, dit_offload_s=copy_s, plan=str(plan),
                dp=plan.dp, offload=offload, dit_offload=dit_offload, quantize=quantize, rank_flops=work["flops"],
                rank_fp8_flops=work["fp8_flops"], rank_memory_bound_bytes=memory_bytes,
                gpu_memory_gb=memory["peak"] / GB, memory=memory)


def _predict_all(params, plans, gpu, mfu, latent_fhw, text_tokens, fused, offloads, dit_offloads, quantize,
                 fp8_skip, dit_reload, gpu_memory_gb) -> list:
    rows = []
    for plan in plans:
        for offload in offloads:
            for dit_offload in dit_offloads:
                row = predict_plan(params, plan, gpu, mfu, latent_fhw, text_tokens, fused, offload=offload,
                                   quantize=quantize, fp8_skip=fp8_skip, dit_offload=dit_offload,
                                   dit_reload=dit_reload)
                row.update(fits=row["gpu_memory_gb"] <= gpu_memory_gb, plan_object=plan)
                rows.append(row)
    return rows


def choose_plan(params, world: int, gpu_memory_gb: float, gpu=cost.H100_SXM, mfu=0.5,
                latent_fhw=cost.PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, fused=False, allowed=None,
                offloads=OFFLOADS, dit_offloads=DIT_OFFLOADS, quantize="none", fp8_skip=(), dit_reload=True):
    """(the fastest (plan, offload, dit_offload) for one video that fits in gpu_memory_gb per GPU, every
    candidate's prediction).

    allowed(plan) -> bool narrows the plans (the degrees a user gave), `offloads` the text-encoder
    settings, `dit_offloads` the dit.offload ones. quantize / fp8_skip are counted as given: FP8 changes the
    video, so the planner never turns it on. Ties (within 1 %) go to fewer data-parallel groups, then to TP
    without Ulysses, then without sequence parallelism, then to keeping T5 (none, after_encode, cpu), then to
    keeping the DiT (none, during_decode): the product's defaults. Raises ValueError, naming the smallest need,
    when nothing fits, and the smallest with dit.quantize=fp8 when only that would fit.
    """
    plans = [plan for plan in candidate_plans(params, world) if allowed is None or allowed(plan)]
    if not plans:
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) agrees with the degrees given")
    search = (gpu, mfu, latent_fhw, text_tokens, fused, offloads, dit_offloads)
    rows = _predict_all(params, plans, *search, quantize, tuple(fp8_skip), dit_reload, gpu_memory_gb)
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        need = min(r["gpu_memory_gb"] for r in rows)
        advice = "use more GPUs"
        if quantize == "none":
            fp8_need = min(r["gpu_memory_gb"] for r in
                           _predict_all(params, plans, *search, "fp8", (), dit_reload, gpu_memory_gb))
            if fp8_need <= gpu_memory_gb:
                advice = (f"with dit.quantize=fp8 it would fit in {fp8_need:.1f} GB (changes the video; README "
                          f"\"FP8 DiT\"), or use more GPUs")
        raise ValueError(f"parallel.plan=auto: no plan of the DiT on {world} GPU(s) fits {gpu_memory_gb:g} GB per GPU "
                         f"(the smallest needs {need:.1f} GB); {advice}")
    best = min(r["end_to_end_s"] for r in fitting)
    close = [r for r in fitting if r["end_to_end_s"] <= best * 1.01]
    chosen = min(close, key=lambda r: (r["plan_object"].dp, r["plan_object"].ulysses > 1,
                                       r["plan_object"].sequence_parallel, OFFLOADS.index(r["offload"]),
                                       DIT_OFFLOADS.index(r["dit_offload"]), r["end_to_end_s"]))
    return chosen["plan_object"], chosen["offload"], chosen["dit_offload"], rows
