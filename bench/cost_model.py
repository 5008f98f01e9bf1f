"""The cost model at the published size: FLOPs, each plan's predicted H100 time and memory, the planner's choice,
and one H100 with and without dit.quantize=fp8.

    python -m bench.cost_model [--mfu 0.5] [--degrees 1 2 4 8] [--no-meta-check] [--memory] [--json F] [--md F]

No weights and no accelerator: the DiT and T5 counts are arithmetic, cross-checked with
torch.utils.flop_counter on meta-device modules of the published size; each plan's work per
rank is counted on the meta device (parallel/rank_work.py); the VAE decode is counted by running
the published CogVideoX decoder on the meta device (~20 s on a CPU; --no-meta-check uses the
stored count).
"""
import argparse
import sys

import torch

from bench.report import Report, add_output_args
from k4flash.dit import DiffusionTransformer3D
from k4flash.published import PUBLISHED_DIT_PARAMS
from parallel import cost
from parallel.counting import count_flops, vae_decode_counts
from parallel.plan import Plan, candidate_plans
from parallel.planner import (ALLOCATOR_HEADROOM, COMMUNICATOR_BYTES, CUDA_CONTEXT_BYTES, OFFLOADS, choose_plan,
                              predict_plan, rank_memory)
from parallel.rank_work import rank_work


def meta_dit_flops(params=PUBLISHED_DIT_PARAMS, latent_fhw=cost.PUBLISHED_LATENT,
                   text_tokens=cost.TEXT_TOKENS) -> int:
    """FlopCounterMode total of one forward of the real module, built and run on the meta device."""
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
        x = torch.empty(1, *latent_fhw, params["in_visual_dim"])
        text = torch.empty(1, text_tokens, params["in_text_dim"])
        t = torch.empty(1)
    return count_flops(lambda: model(x, text, t))["total"]


def meta_t5_flops(tokens=cost.TEXT_TOKENS) -> int:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**cost.T5_XXL, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
        ids = torch.zeros(1, tokens, dtype=torch.long)
    return count_flops(lambda: model(input_ids=ids))["total"]


def _tf(x):
    return f"{x / 1e12:,.3f}"


def _gb(x):
    return f"{x / 1e9:,.2f}"


def _s(x):
    return f"{x:.3f}"


def plan_rows(degrees, mfu, vae, gpu=cost.H100_SXM) -> list:
    """Every plan of one model group on each GPU count: its predicted seconds and memory per rank."""
    rows = []
    for world in degrees:
        for plan in candidate_plans(PUBLISHED_DIT_PARAMS, world):
            if plan.dp > 1:
                continue  # data parallelism adds videos per hour, not speed per video
            eager = predict_plan(PUBLISHED_DIT_PARAMS, plan, gpu, mfu, vae=vae)
            fused = predict_plan(PUBLISHED_DIT_PARAMS, plan, gpu, mfu, fused=True, vae=vae)
            comm = cost.dit_plan_comm(PUBLISHED_DIT_PARAMS, plan.tp, plan.ulysses, plan.sequence_parallel)
            rows.append(dict(gpus=world, plan=str(plan), rank_tflop=eager["rank_flops"] / 1e12,
                             eager_gb=eager["rank_memory_bound_bytes"], fused_gb=fused["rank_memory_bound_bytes"],
                             wire_gb=comm["wire_bytes"], collectives=comm["collectives"],
                             compute_s=eager["dit_step_compute_s"], memory_s=eager["dit_step_memory_s"],
                             fused_memory_s=fused["dit_step_memory_s"], comm_s=eager["dit_step_comm_s"],
                             end_to_end_s=eager["end_to_end_s"], fused_end_to_end_s=fused["end_to_end_s"],
                             gpu_memory_gb=eager["gpu_memory_gb"]))
    return rows


CHOICE_COLUMNS = [("gpus", "GPUs", None), ("quantize", "dit.quantize", None), ("plan", "plan", None),
                  ("offload", "text_encoder.offload", None), ("dit_offload", "dit.offload", None),
                  ("end_to_end_s", "video s", _s), ("dit_offload_s", "of it DiT copies s", _s),
                  ("gpu_memory_gb", "GB / GPU", ".1f"), ("peak_stage", "peak at", None), ("note", "", None)]


def planner_choice(world, memory_gb, mfu, gpu=cost.H100_SXM, quantize="none") -> dict:
    """parallel.plan=auto's choice (plan, text-encoder and DiT offloads) for `world` GPUs of `memory_gb`, as a
    batch or a server runs (the DiT copied out and back around each decode when it is offloaded)."""
    name = f"{world} x {memory_gb} GB"
    try:
        plan, offload, dit_offload, candidates = choose_plan(PUBLISHED_DIT_PARAMS, world, memory_gb, gpu, mfu,
                                                             quantize=quantize)
    except ValueError as err:
        return dict(gpus=name, quantize=quantize, plan="does not fit", note=str(err).split(": ", 1)[1])
    row = next(r for r in candidates if r["plan_object"] == plan and r["offload"] == offload
               and r["dit_offload"] == dit_offload)
    return dict(gpus=name, quantize=quantize, plan=str(plan), offload=offload, dit_offload=dit_offload,
                end_to_end_s=row["end_to_end_s"], dit_offload_s=row["dit_offload_s"],
                gpu_memory_gb=row["gpu_memory_gb"], peak_stage=row["memory"]["peak_stage"],
                note=f"{sum(r['fits'] for r in candidates)} of {len(candidates)} (plan, offloads) fit")


def planner_choices(degrees, sizes_gb, mfu, gpu=cost.H100_SXM, fp8_worlds=()) -> list:
    """planner_choice for each GPU count and memory size in bf16; with dit.quantize=fp8 too for the counts in
    fp8_worlds (asked for: the planner never turns FP8 on)."""
    rows = []
    for memory_gb in sizes_gb:
        for world in degrees:
            rows.append(planner_choice(world, memory_gb, mfu, gpu))
            if world in fp8_worlds:
                rows.append(planner_choice(world, memory_gb, mfu, gpu, quantize="fp8"))
    return rows


def fp8_rows(mfu, vae, gpu=cost.H100_SXM) -> list:
    """One video on one GPU (tp=1, T5 resident, DiT kept), bf16 and dit.quantize=fp8, eager and fused."""
    rows = []
    for quantize in ("none", "fp8"):
        for fused in (False, True):
            p = predict_plan(PUBLISHED_DIT_PARAMS, Plan(), gpu, mfu, fused=fused, vae=vae, quantize=quantize)
            rows.append(dict(quantize=quantize, mode="fused (compile)" if fused else "eager",
                             fp8_tflop=p["rank_fp8_flops"] / 1e12, compute_s=p["dit_step_compute_s"],
                             memory_s=p["dit_step_memory_s"], step_s=p["dit_step_s"], denoise_s=p["denoise_s"],
                             t5_s=p["t5_s"], vae_s=p["vae_s"], end_to_end_s=p["end_to_end_s"],
                             dit_gb=p["memory"]["dit_weights"] / 1e9, acts_gb=p["memory"]["dit_activations"] / 1e9,
                             gpu_memory_gb=p["gpu_memory_gb"]))
    return rows


def memory_report(mfu=0.5, degrees=(1, 2, 4, 8), sizes_gb=(24, 40, 80), gpu=cost.H100_SXM) -> Report:
    """Peak GPU memory per rank of every plan and text-encoder offload, against common GPU sizes."""
    # Its own report name, but the command that printed it is bench.cost_model's.
    command = " ".join(["python", "-m", "bench.cost_model", *sys.argv[1:]])
    report = Report("cost_model_memory", command, gpu=gpu.name, latent=cost.PUBLISHED_LATENT)
    rows = []
    for world in degrees:
        for plan in candidate_plans(PUBLISHED_DIT_PARAMS, world):
            if plan.dp > 1:
                continue
            for offload in OFFLOADS:
                m = rank_memory(PUBLISHED_DIT_PARAMS, plan, offload)
                off = rank_memory(PUBLISHED_DIT_PARAMS, plan, offload, dit_offload="during_decode")
                stages = m["stages"]
                rows.append(dict(gpus=world, plan=str(plan), offload=offload, dit=m["dit_weights"] / 1e9,
                                 t5=m["text_encoder"] / 1e9, dit_acts=m["dit_activations"] / 1e9,
                                 vae_acts=m["vae_activations"] / 1e9, encode=stages["encode"] / 1e9,
                                 denoise=stages["denoise"] / 1e9, decode=stages["decode"] / 1e9,
                                 peak=m["peak"] / 1e9, decode_off=off["stages"]["decode"] / 1e9,
                                 peak_off=off["peak"] / 1e9,
                                 **{f"fits_{size}": _fits(m["peak"], off["peak"], size) for size in sizes_gb}))
    report.table("Peak GPU memory of a model group's first rank (T5, VAE, DiT shard), GB, one 12 s 672x384 video, "
                 "bf16; the last columns with dit.offload=during_decode (the DiT off the GPU for the decode)",
                 [("gpus", "GPUs", None), ("plan", "plan", None), ("offload", "text_encoder.offload", None),
                  ("dit", "DiT weights", ".2f"), ("t5", "T5 resident", ".2f"),
                  ("dit_acts", "DiT activations", ".2f"), ("vae_acts", "VAE decode activations", ".2f"),
                  ("encode", "encode", ".1f"), ("denoise", "denoise", ".1f"), ("decode", "decode", ".1f"),
                  ("peak", "peak", ".1f"), ("decode_off", "decode, DiT offloaded", ".1f"),
                  ("peak_off", "peak, DiT offloaded", ".1f")]
                 + [(f"fits_{size}", f"{size} GB", None) for size in sizes_gb], rows)
    report.table("Which GPUs? The planner's choice for each count and size (bf16; one GPU also with "
                 "dit.quantize=fp8)", CHOICE_COLUMNS, planner_choices(degrees, sizes_gb, mfu, gpu, fp8_worlds=(1,)))
    report.note("Each stage: resident weights + that stage's activations (counted on the meta device), x "
                f"{ALLOCATOR_HEADROOM} allocator headroom, + {CUDA_CONTEXT_BYTES / 1e9:g} GB CUDA context + "
                f"{COMMUNICATOR_BYTES / 1e9:g} GB per communicator. The VAE decodes a band of 1/(ulysses x tp) of "
                "the rows (vae.parallel=true). after_encode: T5 loads first and is freed before the DiT loads; "
                "cpu: T5 in pinned host memory, 2 blocks on the GPU at a time. dit.offload=during_decode: the DiT's "
                "weights leave the GPU before the decode; a batch or a server copies them to pinned host memory and "
                f"back for the next video, {gpu.pcie_bytes_per_s / 1e9:g} GB/s each way over PCIe (an assumption: "
                "PCIe 4 x16 with pinned memory), counted in 'video s' and shown apart; one video frees them.")
    report.note("dit.quantize=fp8 is never the planner's choice (it changes the video); its rows are what "
                "asking for it gives: e4m3 weights with float32 row scales for the blocks' attention and MLP, and "
                "their inputs' float32 and e4m3 copies counted in the DiT activations.")
    return report


def _fits(peak, peak_dit_offloaded, size_gb) -> str:
    if peak / 1e9 <= size_gb:
        return "yes"
    return "with dit.offload" if peak_dit_offloaded / 1e9 <= size_gb else "no"


def build_report(mfu=0.5, degrees=(1, 2, 4, 8), meta_check=True) -> Report:
    params = PUBLISHED_DIT_PARAMS
    gpu = cost.H100_SXM
    flops = cost.dit_flops(params)
    report = Report("cost_model", mfu=mfu, gpu=gpu.name, latent=cost.PUBLISHED_LATENT,
                    text_tokens=cost.TEXT_TOKENS, steps=cost.NUM_STEPS)

    rows = [dict(part=name, tflop=flops[name], share=flops[name] / flops["total"])
            for name in ("qkv", "attention_out", "mlp", "modulation", "embeddings", "linear", "attention", "total")]
    if meta_check:
        counted = meta_dit_flops()
        rows.append(dict(part="total, FlopCounterMode (meta)", tflop=counted, share=counted / flops["total"]))
    report.table(f"DiT FLOPs per forward: {flops['visual_tokens']:,} visual + {flops['text_tokens']} text tokens, "
                 f"{2 * params['num_blocks']} blocks (x {cost.NUM_STEPS} steps per video)",
                 [("part", "part", None), ("tflop", "TFLOP", _tf), ("share", "share of total", ".3f")], rows)

    vae = vae_decode_counts() if meta_check else cost.PUBLISHED_VAE_DECODE
    report.table(f"Each plan on 1-{max(degrees)} {gpu.name}: one DiT step per rank, and one video end to end "
                 f"(MFU {mfu:.0%}; memory-bound bytes at HBM speed; comm on NVLink; no overlap)", [
                     ("gpus", "GPUs", None), ("plan", "plan", None), ("rank_tflop", "TFLOP / rank", ".1f"),
                     ("eager_gb", "memory-bound GB eager", _gb), ("fused_gb", "GB fused", _gb),
                     ("wire_gb", "GB sent", _gb), ("collectives", "collectives", None),
                     ("compute_s", "compute s", _s), ("memory_s", "memory s eager", _s),
                     ("fused_memory_s", "memory s fused", _s), ("comm_s", "comm s", _s),
                     ("end_to_end_s", "video s eager", _s), ("fused_end_to_end_s", "video s fused", _s),
                     ("gpu_memory_gb", "GB / GPU", ".1f")], plan_rows(degrees, mfu, vae, gpu))

    t5 = cost.t5_encoder_flops(**cost.T5_XXL)
    other = [dict(stage="VAE decode 25x48x84 -> 97x384x672 (meta run)" if meta_check else
                  "VAE decode 25x48x84 -> 97x384x672 (stored meta count)", tflop=vae["conv_flops"],
                  bytes=vae["elementwise_bytes"], note="convolutions; bytes: GroupNorm/SiLU/pad/cat/upsample, unfused; "
                  f"{vae['row_parallel_collectives']} halo/GroupNorm collectives when split by rows"),
             dict(stage="T5-XXL encode, 224 tokens (analytic)", tflop=t5["total"],
                  bytes=2 * cost.t5_encoder_params(**cost.T5_XXL), note="bytes: bf16 weights read once")]
    if meta_check:
        other.append(dict(stage="T5-XXL encode, FlopCounterMode (meta)", tflop=meta_t5_flops(), bytes=None, note=""))
    report.table("VAE decode and text encode", [("stage", "stage", None), ("tflop", "TFLOP", _tf),
                                                ("bytes", "GB moved", _gb), ("note", "what", None)], other)

    report.table("parallel.plan=auto: the plan chosen (fastest predicted video that fits), with its prediction",
                 CHOICE_COLUMNS, planner_choices(degrees, (80, 24), mfu, gpu))
    report.table(f"One video on 1 {gpu.name}, bf16 and dit.quantize=fp8 (tp=1, T5 and the DiT resident; MFU "
                 f"{mfu:.0%} of the bf16 and of the FP8 peak)", [
                     ("quantize", "dit.quantize", None), ("mode", "DiT", None),
                     ("fp8_tflop", "FP8 TFLOP / step", ".1f"), ("compute_s", "compute s / step", _s),
                     ("memory_s", "memory s / step", _s), ("step_s", "step s", _s), ("denoise_s", "denoise s", _s),
                     ("t5_s", "T5 s", _s), ("vae_s", "VAE s", _s), ("end_to_end_s", "video s", _s),
                     ("dit_gb", "DiT weights GB", ".2f"), ("acts_gb", "DiT activations GB", ".2f"),
                     ("gpu_memory_gb", "GB / GPU", ".1f")], fp8_rows(mfu, vae, gpu))
    report.note(f"{gpu.name}: {gpu.peak_bf16_flops / 1e12:.1f} TFLOP/s dense bf16, {gpu.hbm_bytes_per_s / 1e12:.2f} "
                f"TB/s HBM, {gpu.link_bytes_per_s / 1e9:.0f} GB/s NVLink per direction (datasheet). MFU {mfu:.0%} is an "
                f"assumption, not a measurement. FP8: {gpu.peak_fp8_flops / 1e12:.1f} TFLOP/s dense (datasheet), at "
                f"the same MFU; host <-> GPU {gpu.pcie_bytes_per_s / 1e9:g} GB/s (assumed).")
    bf16_work, fp8_work = (rank_work(params, Plan(), quantize=q) for q in ("none", "fp8"))
    per_input = (fp8_work["memory_bytes"] - bf16_work["memory_bytes"]) / fp8_work["fp8_input_elements"]
    report.note("dit.quantize=fp8 eager: each FP8 matmul's input is quantized per token by k4flash/fp8.py's passes "
                "(|max| in float32, a float32 copy of a block of rows divided and clamped in place, the e4m3 write) "
                f"and the bias added after the matmul: {per_input:.1f} bytes per input element, counted on the meta "
                f"device; 'fused' counts {cost.FP8_FUSED_QUANTIZE_BYTES} bytes per input element, what one compiled "
                "kernel reads and writes.")
    report.note("Per rank: FLOPs and eager memory-bound bytes counted by running the plan's code for one rank on "
                "the meta device in bf16 (parallel/rank_work.py; its float32 copies for RoPE and the time embedding "
                "included); 'fused' is the floor once torch.compile fuses each block's elementwise work "
                "(parallel/cost.py dit_fused_bytes); GB / GPU is the first-order memory estimate of the busiest rank "
                "(T5-XXL resident on it).")
    report.note("FLOPs: 2 per multiply-add, Linear biases and elementwise ops not counted (as FlopCounterMode). "
                "Attention = QK^T + AV = 4(N+L)^2 D per block.")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.5, help="assumed model-FLOP utilisation for the second row")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--no-meta-check", action="store_true", help="skip the FlopCounterMode cross-checks")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak GPU memory per rank for each plan and text-encoder offload (and with "
                             "dit.offload=during_decode), and the planner's choice for 24, 40 and 80 GB GPUs (one GPU "
                             "also with dit.quantize=fp8)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.memory:
        return memory_report(args.mfu, args.degrees).emit(args.json, args.md)
    return build_report(args.mfu, args.degrees, not args.no_meta_check).emit(args.json, args.md)


if __name__ == "__main__":
    main()
