"""A cost model of one generation: FLOPs, bytes moved and communicated, and the latency they predict.

DiT, per forward (one video, batch 1), with N visual tokens, L text tokens, S = N + L,
D = model_dim, F = ff_dim, T = time_dim, P = prod(patch_size), C = latent channels and
B = 2·num_blocks transformer blocks. A Linear of `in → out` applied to `t` tokens costs
2·t·in·out FLOPs (multiply-add = 2; the bias add is not counted, as FlopCounterMode does not):

  linear    = B · (2·S·D·3D  [QKV] + 2·S·D·D  [attention out] + 2·2·S·D·F  [MLP]
                   + 2·2·T·6D  [visual + text modulation, on the time embedding])
              + 2·(D·T + T·T)  [time embedding] + 2·L·4096·D  [text in] + 2·N·P·C·D  [visual in]
              + 2·T·2D + 2·N·D·P·C  [out modulation, out projection]
  attention = B · 4·S²·D       [QKᵀ and A·V, 2·S²·head_dim each, over all heads]

Norms, RoPE, softmax and the other elementwise work are not FLOPs here (they are memory
bound and a few % of the time on a GPU). `count_flops` (parallel/counting.py) checks these
formulas against torch.utils.flop_counter on the real module (tests: real tensors, small config; the
benchmark: the published size on the meta device).

Tensor parallel communication per forward (parallel/tp.py): 2 all-reduces per block of
the (S, D) activations plus one all-gather of every modulation vector. A ring all-reduce
of M bytes sends 2·(k−1)/k·M per rank, an all-gather (k−1)/k of the gathered size.

The VAE decode is counted by running diffusers' AutoencoderKLCogVideoX at its published
config on the meta device (`counting.vae_decode_counts`): convolution FLOPs from FlopCounterMode,
and the bytes every other (memory-bound) op reads and writes, at 2 bytes per element
(bf16) and with no fusion. T5-XXL is analytic (`t5_encoder_flops`), checked the same way.
"""
import math
from dataclasses import dataclass

from k4flash.geometry import latent_shape
from k4flash.published import (DEFAULT_HEIGHT, DEFAULT_TIME_LENGTH, DEFAULT_WIDTH, NUM_STEPS, PUBLISHED_DIT_PARAMS,
                               TEXT_TOKENS)

# The published geometry: 12 s at 672×384 → latents (25, 48, 84, 16) → 25 × 24 × 42 patches.
PUBLISHED_LATENT = latent_shape(DEFAULT_TIME_LENGTH, DEFAULT_HEIGHT, DEFAULT_WIDTH)[:3]
SEED_CLAIM_S = 11.0  # model card: a 12 s 480p video in 11 s on one H100
# T5-v1.1-XXL encoder (the published text encoder's config.json).
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128)


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16_flops: float  # dense, no sparsity
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # per GPU, one direction: what a ring all-reduce step can use
    collective_latency_s: float  # fixed cost per collective call (NCCL launch + sync), assumed
    peak_fp8_flops: float = None  # dense e4m3 tensor-core rate; None: no FP8 tensor cores
    pcie_bytes_per_s: float = 25e9  # host <-> GPU, pinned memory, one direction, as copies reach it


# NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16, 1978.9 dense FP8 (the figures of
# bench/gpu_check/peaks.py; tests/test_bench.py holds them equal), 3.35 TB/s HBM3, NVLink 4 at 900 GB/s
# per GPU in both directions together (450 GB/s each way). 10 µs per collective is an assumption, and so
# is 25 GB/s host <-> GPU: what pinned copies reach on PCIe 4 x16 (the 24 GB cards: RTX 4090, L4, A10),
# and a conservative floor for the H100's PCIe 5 x16 (~50 GB/s).
H100_SXM = GPU("H100 SXM5", 989.4e12, 3.35e12, 450e9, 10e-6, peak_fp8_flops=1978.9e12, pcie_bytes_per_s=25e9)
# A fused FP8 input quantization (torch.compile): each bf16 input read twice (its max |x| per token, then
# scaled and cast) and written once in e4m3; eager runs k4flash/fp8.py quantize_rows's passes, counted.
FP8_FUSED_QUANTIZE_BYTES = 2 + 2 + 1  # per input element


def dit_tokens(params: dict, latent_fhw=PUBLISHED_LATENT) -> int:
    return math.prod(size // p for size, p in zip(latent_fhw, params["patch_size"]))


def dit_flops(params: dict, latent_fhw=PUBLISHED_LATENT, text_tokens=TEXT_TOKENS, batch=1) -> dict:
    """FLOPs of one DiT forward, split as in the module docstring: {linear, attention, total, ...parts}."""
    D, F, T = params["model_dim"], params["ff_dim"], params["time_dim"]
    P = math.prod(params["patch_size"])
    N, L = dit_tokens(params, latent_fhw), text_tokens
    S = N + L
    blocks = 2 * params["num_blocks"]
    parts = {
        "qkv": blocks * 2 * S * D * 3 * D,
        "attention_out": blocks * 2 * S * D * D,
        "mlp": blocks * 2 * 2 * S * D * F,
        "modulation": blocks * 2 * 2 * T * 6 * D + 2 * T * 2 * D,
        "embeddings": 2 * (D * T + T * T) + 2 * L * params["in_text_dim"] * D + 2 * N * P * params["in_visual_dim"] * D
        + 2 * N * D * P * params["out_visual_dim"],
    }
    linear = sum(parts.values())
    attention = blocks * 4 * S * S * D
    out = {k: batch * v for k, v in parts.items()}
    out.update(linear=batch * linear, attention=batch * attention, total=batch * (linear + attention),
               visual_tokens=N, text_tokens=L)
    return out


def token_shards(total: int, tp=1, ulysses=1, sequence_parallel=False) -> dict:
    """How a plan splits S = N + L tokens: shards, padded length, tokens per rank between blocks (local) and in
    one Ulysses shard (ulysses_shard: what a TP group works on). Unsharded (plain TP, or one rank): S itself."""
    count = ulysses * (tp if sequence_parallel and tp > 1 else 1)
    padded = -(-total // count) * count
    return dict(count=count, padded=padded, local=padded // count, ulysses_shard=padded // ulysses)


def dit_plan_comm(params: dict, tp=1, ulysses=1, sequence_parallel=False, latent_fhw=PUBLISHED_LATENT,
                  text_tokens=TEXT_TOKENS, bytes_per_element=2, batch=1) -> dict:
    """Collectives of one DiT forward per rank for a plan (parallel/tp.py, parallel/sequence.py).

    calls / payload: {op: count} and {op: bytes this rank hands to that op}, as parallel.comm.STATS
    counts them; payload_bytes: their sum; wire_bytes: what each rank puts on its link (ring
    all-reduce 2(k-1)/k of the tensor; all-gather (k-1)x the local piece; reduce-scatter and
    all-to-all (k-1)/k of the input).
    """
    sp = sequence_parallel and tp > 1
    S = dit_tokens(params, latent_fhw) + text_tokens
    D, e = params["model_dim"], bytes_per_element * batch
    blocks = 2 * params["num_blocks"]
    shards = token_shards(S, tp, ulysses, sp)
    s, s_u = shards["local"], shards["ulysses_shard"]
    calls, payload, wire = {}, {}, 0.0

    def add(op, n, each, sent_per_call):
        nonlocal wire
        calls[op] = calls.get(op, 0) + n
        payload[op] = payload.get(op, 0) + n * each
        wire += n * sent_per_call

    if tp > 1:
        modulation = (blocks * 2 * 6 * D + 2 * D) * e // tp  # this rank's rows of every modulation output
        add("all_gather", 1, modulation, (tp - 1) * modulation)
        if sp:  # per block: gather before QKV and the MLP's input layer, reduce-scatter after the two row layers
            add("all_gather", 2 * blocks, s * D * e, (tp - 1) * s * D * e)
            add("reduce_scatter", 2 * blocks, s_u * D * e, (tp - 1) / tp * s_u * D * e)
        else:
            add("all_reduce", 2 * blocks, s_u * D * e, 2 * (tp - 1) / tp * s_u * D * e)
    if ulysses > 1:  # q, k, v of this rank's TP heads there, the attention output back
        for width in (3 * D // tp, D // tp):
            add("all_to_all", blocks, s_u * width * e, (ulysses - 1) / ulysses * s_u * width * e)
    out = math.prod(params["patch_size"]) * params["out_visual_dim"]  # the output layer's values per token
    if sp:  # the output layer's rows gathered from every token shard, TP level first
        add("all_gather", 1, s * out * e, (tp - 1) * s * out * e)
    if ulysses > 1:
        add("all_gather", 1, s_u * out * e, (ulysses - 1) * s_u * out * e)
    return dict(calls=calls, payload=payload, payload_bytes=sum(payload.values()), wire_bytes=wire,
                collectives=sum(calls.values()))


def dit_fused_bytes(params: dict, tp=1, ulysses=1, sequence_parallel=False, latent_fhw=PUBLISHED_LATENT,
                    text_tokens=TEXT_TOKENS, bytes_per_element=2, batch=1) -> int:
    """Memory-bound traffic of one DiT forward per rank once torch.compile fuses each block's elementwise work.

    Each fused region reads its activations once and writes its result once: per block, twice
    (attention, MLP) norm + modulate (read x, write h: 2tD) and the gated residual (read x and
    the update, write x: 3tD) over the rank's t tokens; q/k norms, RoPE and the layout copies
    (read q, k, v, write them: 6·S·w over the whole sequence and the rank's attention width w);
    GELU (2·t_u·F/tp over the tokens the TP layers see). An estimate, not a count: eager
    traffic is counted (parallel/plan.py), this is its floor.
    """
    sp = sequence_parallel and tp > 1
    S = dit_tokens(params, latent_fhw) + text_tokens
    D, F = params["model_dim"], params["ff_dim"]
    shards = token_shards(S, tp, ulysses, sp)
    t, t_u, width = shards["local"], shards["ulysses_shard"], D // (tp * ulysses)
    per_block = 2 * (2 * t * D + 3 * t * D) + 6 * S * width + 2 * t_u * F // tp
    return 2 * params["num_blocks"] * per_block * bytes_per_element * batch


def t5_encoder_flops(tokens=TEXT_TOKENS, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                     **_) -> dict:
    """T5 v1.1 encoder (gated-GELU MLP: two input projections), one prompt of `tokens` tokens."""
    inner = num_heads * d_kv
    linear = num_layers * (2 * tokens * d_model * inner * 4 + 2 * tokens * d_model * d_ff * 3)
    attention = num_layers * 4 * tokens * tokens * inner
    return dict(linear=linear, attention=attention, total=linear + attention)


def t5_block_params(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, **_) -> int:
    """One T5 v1.1 encoder block: q, k, v, o; the gated MLP's three matrices; two RMSNorm weights."""
    return 4 * d_model * num_heads * d_kv + 3 * d_model * d_ff + 2 * d_model


def t5_encoder_params(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128) -> int:
    return vocab_size * d_model + num_layers * t5_block_params(d_model, d_ff, num_heads, d_kv) + d_model


# AutoencoderKLCogVideoX at its published config: parameters, and vae_decode_counts() at the published
# geometry (25 latent frames of 48 x 84); tests hold both to a meta-device run.
VAE_PARAMS = 215_583_907
PUBLISHED_VAE_DECODE = dict(conv_flops=464_843_521_916_928, elementwise_bytes=1_460_153_230_848,
                            frames=(1, 3, 97, 384, 672), row_parallel_collectives=936)


# vae_decode_peak_bytes at 48 x 84 latents on one rank, bf16: a video (2-frame chunks) and an image (1 frame).
# The peak is one chunk's, so it scales with the band's area (h / bands × w), not with the frame count.
VAE_DECODE_PEAK = {"video": 11_813_437_440, "image": 2_670_538_752}


def scaled_vae_decode_peak(latent_fhw=PUBLISHED_LATENT, bands=1, bytes_per_element=2) -> float:
    """VAE_DECODE_PEAK for another geometry, band count and element size, without the meta run."""
    f, h, w = latent_fhw
    area = (h / bands) * w / (PUBLISHED_LATENT[1] * PUBLISHED_LATENT[2])
    return VAE_DECODE_PEAK["image" if f == 1 else "video"] * area * bytes_per_element / 2


def scaled_vae_counts(latent_fhw=PUBLISHED_LATENT) -> dict:
    """PUBLISHED_VAE_DECODE scaled by the latent volume (the decode is convolutional: linear in it), without
    the ~20 s meta run; the frame count and size follow the geometry."""
    ratio = math.prod(latent_fhw) / math.prod(PUBLISHED_LATENT)
    f, h, w = latent_fhw
    return dict(PUBLISHED_VAE_DECODE, conv_flops=PUBLISHED_VAE_DECODE["conv_flops"] * ratio,
                elementwise_bytes=PUBLISHED_VAE_DECODE["elementwise_bytes"] * ratio,
                frames=(1, 3, 4 * (f - 1) + 1, 8 * h, 8 * w))



def predict(params=None, gpu=H100_SXM, tp=1, mfu=1.0, steps=NUM_STEPS, latent_fhw=PUBLISHED_LATENT,
            text_tokens=TEXT_TOKENS, vae=None, vae_ranks=1, ulysses=1, sequence_parallel=False,
            rank_flops=None, rank_memory_bytes=None, rank_fp8_flops=0) -> dict:
    """Predicted seconds per stage for one video on tp · ulysses GPUs at model-FLOP utilisation `mfu`.

    DiT step = rank FLOPs / (peak · mfu) + memory-bound bytes / HBM + wire bytes / link + calls ·
    latency, with no overlap. rank_flops / rank_memory_bytes: one rank's counts (parallel/plan.py
    counts them on the meta device); by default the FLOPs split evenly and no memory-bound term.
    rank_fp8_flops: the part of rank_flops in FP8 matmuls (dit.quantize=fp8), at the FP8 peak · mfu.
    T5 runs on one GPU and takes the larger of its compute and reading its weights once. The VAE
    adds its elementwise traffic at HBM bandwidth to its convolution time, split over `vae_ranks`
    GPUs by the row-parallel decode (vae.parallel) plus one latency per halo exchange / GroupNorm
    all-reduce and the uint8 frame gather. `vae`: counting.vae_decode_counts().
    """
    params = params or PUBLISHED_DIT_PARAMS
    ranks = tp * ulysses
    flops = dit_flops(params, latent_fhw, text_tokens)
    comm = dit_plan_comm(params, tp, ulysses, sequence_parallel, latent_fhw, text_tokens)
    rank_flops = flops["total"] / ranks if rank_flops is None else rank_flops
    if rank_fp8_flops and not gpu.peak_fp8_flops:
        raise ValueError(f"{gpu.name} has no FP8 tensor cores: dit.quantize=fp8 cannot be predicted on it")
    compute_s = (rank_flops - rank_fp8_flops) / (gpu.peak_bf16_flops * mfu) \
        + (rank_fp8_flops / (gpu.peak_fp8_flops * mfu) if rank_fp8_flops else 0.0)
    memory_s = (rank_memory_bytes or 0) / gpu.hbm_bytes_per_s
    comm_s = comm["wire_bytes"] / gpu.link_bytes_per_s + comm["collectives"] * gpu.collective_latency_s
    t5 = t5_encoder_flops(text_tokens, **T5_XXL)
    t5_s = max(t5["total"] / (gpu.peak_bf16_flops * mfu), 2 * t5_encoder_params(**T5_XXL) / gpu.hbm_bytes_per_s)
    if vae is None:
        from .counting import vae_decode_counts  # the meta-device run (~20 s): only when no counts are given

        vae = vae_decode_counts(latent_fhw)
    vae_s = (vae["conv_flops"] / (gpu.peak_bf16_flops * mfu) + vae["elementwise_bytes"] / gpu.hbm_bytes_per_s) / vae_ranks
    if vae_ranks > 1:
        frame_bytes = math.prod(vae.get("frames", (1,)))  # the bands are gathered as uint8: a byte per value
        vae_s += vae.get("row_parallel_collectives", 0) * gpu.collective_latency_s + frame_bytes / gpu.link_bytes_per_s
    step_s = compute_s + memory_s + comm_s
    return dict(gpu=gpu.name, tp=tp, ulysses=ulysses, sequence_parallel=sequence_parallel, mfu=mfu, steps=steps,
                dit_step_compute_s=compute_s, dit_step_memory_s=memory_s, dit_step_comm_s=comm_s,
                dit_step_s=step_s, denoise_s=steps * step_s, t5_s=t5_s, vae_ranks=vae_ranks, vae_s=vae_s,
                end_to_end_s=t5_s + steps * step_s + vae_s)
