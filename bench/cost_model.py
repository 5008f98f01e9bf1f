"""The cost model at the published size: FLOPs, bytes all-reduced, predicted H100 latency (k4flash/cost.py).

    python -m bench.cost_model [--mfu 0.5] [--degrees 1 2 4 8] [--no-meta-check] [--json F] [--md F]

No weights and no accelerator: the DiT and T5 counts are arithmetic, cross-checked with
torch.utils.flop_counter on meta-device modules of the published size; the VAE decode is
counted by running the published CogVideoX decoder on the meta device (~20 s on a CPU).
"""
import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/cost_model.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, add_output_args  # noqa: E402
from k4flash.tools import cost  # noqa: E402
from k4flash.dit import DiffusionTransformer3D  # noqa: E402
from k4flash.published import PUBLISHED_DIT_PARAMS  # noqa: E402


def meta_dit_flops(params=PUBLISHED_DIT_PARAMS, latent_fhw=cost.PUBLISHED_LATENT,
                   text_tokens=cost.TEXT_TOKENS) -> int:
    """FlopCounterMode total of one forward of the real module, built and run on the meta device."""
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
        x = torch.empty(1, *latent_fhw, params["in_visual_dim"])
        text = torch.empty(1, text_tokens, params["in_text_dim"])
        t = torch.empty(1)
    return cost.count_flops(lambda: model(x, text, t))["total"]


def meta_t5_flops(tokens=cost.TEXT_TOKENS) -> int:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**cost.T5_XXL, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
        ids = torch.zeros(1, tokens, dtype=torch.long)
    return cost.count_flops(lambda: model(input_ids=ids))["total"]


def _tf(x):
    return f"{x / 1e12:,.3f}"


def _gb(x):
    return f"{x / 1e9:,.2f}"


def _s(x):
    return f"{x:.3f}"


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

    comm_rows = []
    for tp in degrees:
        comm = cost.dit_tp_comm(params, tp)
        pred = cost.predict(params, gpu, tp=tp, mfu=1.0, vae={"conv_flops": 0, "elementwise_bytes": 0})
        comm_rows.append(dict(tp=tp, collectives=comm["all_reduce_calls"] + comm["all_gather_calls"],
                              all_reduce_bytes=comm["all_reduce_bytes"], ring_bytes_sent=comm["ring_bytes_sent"],
                              comm_s=pred["dit_step_comm_s"], compute_s_at_peak=pred["dit_step_compute_s"]))
    report.table("Tensor-parallel communication per DiT step (bf16; ring all-reduce on NVLink 4, 450 GB/s per "
                 "direction, 10 us per collective)",
                 [("tp", "tp", None), ("collectives", "collectives", None),
                  ("all_reduce_bytes", "GB all-reduced (payload)", _gb),
                  ("ring_bytes_sent", "GB sent per GPU (ring)", _gb), ("comm_s", "comm s", _s),
                  ("compute_s_at_peak", "compute s at peak", _s)], comm_rows)

    vae = cost.vae_decode_counts()
    t5 = cost.t5_encoder_flops(**cost.T5_XXL)
    other = [dict(stage="VAE decode 25x48x84 -> 97x384x672 (meta run)", tflop=vae["conv_flops"],
                  bytes=vae["elementwise_bytes"], note="convolutions; bytes: GroupNorm/SiLU/pad/cat/upsample, unfused; "
                  f"{vae['row_parallel_collectives']} halo/GroupNorm collectives when split by rows"),
             dict(stage="T5-XXL encode, 224 tokens (analytic)", tflop=t5["total"],
                  bytes=2 * cost.t5_encoder_params(**cost.T5_XXL), note="bytes: bf16 weights read once")]
    if meta_check:
        other.append(dict(stage="T5-XXL encode, FlopCounterMode (meta)", tflop=meta_t5_flops(), bytes=None, note=""))
    report.table("VAE decode and text encode", [("stage", "stage", None), ("tflop", "TFLOP", _tf),
                                                ("bytes", "GB moved", _gb), ("note", "what", None)], other)

    latency = []
    for tp in sorted({1, max(degrees)}):
        for vae_ranks in sorted({1, tp}):  # vae.parallel=false / true (the row split of parallel/vae.py)
            for m in sorted({1.0, mfu}, reverse=True):
                p = cost.predict(params, gpu, tp=tp, mfu=m, vae=vae, vae_ranks=vae_ranks)
                latency.append(dict(p, setup=f"{tp}x {gpu.name}", seed_claim_s=cost.SEED_CLAIM_S))
    report.table("Predicted latency of one 12 s 672x384 video (T5 on one GPU; compute and comm not overlapped)",
                 [("setup", "GPUs", None), ("mfu", "MFU", ".0%"), ("t5_s", "T5 s", _s), ("dit_step_s", "DiT step s", _s),
                  ("denoise_s", f"{cost.NUM_STEPS} steps s", _s), ("vae_ranks", "VAE ranks", None), ("vae_s", "VAE s", _s),
                  ("end_to_end_s", "end-to-end s", _s), ("seed_claim_s", "seed (model card, 1 H100) s", ".0f")],
                 latency)
    report.note(f"{gpu.name}: {gpu.peak_bf16_flops / 1e12:.1f} TFLOP/s dense bf16, {gpu.hbm_bytes_per_s / 1e12:.2f} "
                f"TB/s HBM, {gpu.link_bytes_per_s / 1e9:.0f} GB/s NVLink per direction (datasheet). MFU 100% is a "
                f"lower bound on latency; {mfu:.0%} is an assumption, not a measurement.")
    report.note("FLOPs: 2 per multiply-add, Linear biases and elementwise ops not counted (as FlopCounterMode). "
                "Attention = QK^T + AV = 4(N+L)^2 D per block.")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.5, help="assumed model-FLOP utilisation for the second row")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--no-meta-check", action="store_true", help="skip the FlopCounterMode cross-checks")
    add_output_args(parser)
    args = parser.parse_args(argv)
    return build_report(args.mfu, args.degrees, not args.no_meta_check).emit(args.json, args.md)


if __name__ == "__main__":
    main()
