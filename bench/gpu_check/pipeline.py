"""Section 10: the pipeline end to end with random weights, as a user's run goes: T5 (the published T5-XXL shape
on a GPU), the DiT and the VAE in one Kandinsky4T2VPipeline, one video through `generate` and `write_outputs`,
per text_encoder.offload mode. It runs what no other section does: T5 and the writers on the run's device, the
T5 block streamer (offload=cpu), the deferred DiT (after_encode).

On the GPU: 12 s at 672x384, bf16, stage times and peak memory against the seed's 11 s. With --smoke: the tiny
models at 512x512, one frame, fp32. Every mode must give the latents of offload=none (the same weights, seed and
kernels: bit for bit). Where no MP4 encoder is installed (a wheelhouse made `--without video`), the frames are
written as PNGs and the row says so.
"""
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_check.run import log
from bench.random_weights import build_random_dit, build_random_t5, build_random_vae
from bench.timing import synchronize
from parallel import cost

PROMPT = "a red fox runs through fresh snow at dawn, cinematic"
MODES = ("none", "after_encode", "cpu")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from k4flash.tiny import write_tiny_tokenizer  # the tiny model's offline tokenizer: any ids will do
    write_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _geometry(run) -> dict:
    if run.config_name == "published":
        return dict(time_length=12, width=672, height=384)  # the published latent: 25 x 48 x 84
    return dict(time_length=0, width=512, height=512)


def _t5_shape(run) -> dict:
    if run.config_name == "published":
        return {k: v for k, v in cost.T5_XXL.items() if k != "vocab_size"}
    from k4flash.tiny import TINY_T5_CONFIG
    return TINY_T5_CONFIG


def run_pipeline(run, offload: str, tokenizer, workdir: Path) -> tuple:
    """One video with text_encoder.offload=`offload`: (its row, its latents on the CPU)."""
    from k4flash.ffmpeg import mp4_encoder_problem
    from k4flash.pipeline import Kandinsky4T2VPipeline
    from k4flash.sampler import load_schedule
    from k4flash.text_encoder import T5TextEncoder

    device, dtype, params = run.device, run.dtype, run.config["params"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    vocab = math.ceil(len(tokenizer) / 128) * 128
    # Built on the device in every mode, so that every mode has the same weights (a host generator draws other
    # numbers); offload=cpu then keeps them in host memory, as a checkpoint loaded there would be.
    t5 = build_random_t5(_t5_shape(run), vocab, device, dtype)
    if offload == "cpu":
        t5 = t5.cpu()
    text_encoder = T5TextEncoder.from_modules(t5, tokenizer, device=device, dtype=dtype, offload=offload)
    dit = (lambda: build_random_dit(params, device, dtype)) if offload == "after_encode" else \
        build_random_dit(params, device, dtype)
    vae = build_random_vae(run.config["vae"], device, dtype)
    pipe = Kandinsky4T2VPipeline({"dit": device, "vae": device, "text_embedder": device}, dit, text_encoder, vae,
                                 load_schedule(None), dtype=dtype, text_dim=params["in_text_dim"])
    synchronize(device)
    build_s = time.perf_counter() - clock
    geometry = _geometry(run)
    log(f"10. pipeline, text_encoder.offload={offload}: {geometry}")
    generation = pipe.generate(PROMPT, seed=0, progress=False, **geometry)
    clock = time.perf_counter()
    problem = mp4_encoder_problem() if geometry["time_length"] else None
    if problem is None:
        written = pipe.write_outputs(generation, workdir / f"{offload}.mp4").suffix.lstrip(".")
    else:  # no MP4 encoder on this node: the frames as PNGs, and the row says so
        from k4flash.outputs import write_png
        for index, frame in enumerate(generation.frames):
            write_png(workdir / f"{offload}-{index:03d}.png", frame)
        written = f"png frames ({problem.split(':')[0]})"
    write_s = time.perf_counter() - clock
    timings = generation.timings
    row = dict(offload=offload, video="{time_length} s {width}x{height}".format(**geometry), build_s=build_s,
               text_encode_s=timings["text_encode_s"], denoise_s=timings["denoise_s"],
               decode_s=timings["decode_s"], write_s=write_s, written=written,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               latents_finite=bool(torch.isfinite(generation.latents).all()))
    row["total_s"] = row["text_encode_s"] + row["denoise_s"] + row["decode_s"] + row["write_s"]
    row["vs_seed"] = cost.SEED_CLAIM_S / row["total_s"]
    return row, generation.latents.cpu()


def pipeline_rows(run) -> list:
    """A row per text_encoder.offload mode, each with whether its latents equal offload=none's."""
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="gpu_check_pipeline_") as tmp:
        tokenizer = _tokenizer(Path(tmp) / "tokenizer")
        for offload in MODES:
            row, latents = run_pipeline(run, offload, tokenizer, Path(tmp))
            reference = latents if reference is None else reference
            row["latents_equal_none"] = bool(torch.equal(latents, reference))
            rows.append(row)
    return rows
