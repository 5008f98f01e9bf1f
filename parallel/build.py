"""A rank's pipeline: its DiT shard everywhere, T5 on the TP group's first rank, the VAE on every rank of
the group (row-parallel decode, parallel/vae.py) or, with vae_parallel=False, on the first rank only."""
import functools

import torch

from k4flash.pipeline import get_T2V_pipeline, normalize_device_map
from k4flash.weights import load_dit, resolve_weight_paths

from .load import load_dit_sharded
from .runtime import init_runtime
from .vae import decode_latents_parallel, parallelize_vae


def get_parallel_T2V_pipeline(device_map, resolution=512, cache_dir="./weights/", dit_path=None,
                              text_encoder_path=None, tokenizer_path=None, vae_path=None, scheduler_path=None,
                              conf_path=None, *, dit_params=None, dtype=None, download=True,
                              noise_dtype=torch.bfloat16, runtime=None, tp=None, compile=False,
                              vae_parallel=True):
    """get_T2V_pipeline for one rank of a tensor-parallel run (joins the process group if needed).

    On GPU each rank uses its own device (cuda:LOCAL_RANK) for the DiT, whatever device_map says.
    vae_parallel: when the TP group has more than one rank, all of them decode (a band of rows each)
    and the group's first rank gets the frames; False: the first rank decodes alone.
    """
    device_map = normalize_device_map(device_map)
    runtime = runtime or init_runtime("cuda" if device_map["dit"].type == "cuda" else "cpu", tp=tp)
    device_map = {**device_map, "dit": runtime.device}
    if runtime.is_main and download and conf_path is None:
        # Fetch anything missing once, on rank 0, before the others look for it.
        resolve_weight_paths(cache_dir, dit_path, text_encoder_path, tokenizer_path, vae_path, scheduler_path)
    runtime.barrier()
    # Off the group's first rank T5 (and, without vae_parallel, the VAE) are not loaded; with several
    # groups per node each group's first rank must use its own GPU: either way, everything on this rank's.
    if not runtime.is_group_main or runtime.dp_size > 1:
        device_map = {key: runtime.device for key in device_map}
    sharded = runtime.tp_size > 1
    decode_on_all_ranks = sharded and vae_parallel
    pipe = get_T2V_pipeline(
        device_map, resolution, cache_dir, dit_path, text_encoder_path, tokenizer_path, vae_path, scheduler_path,
        conf_path, dit_params=dit_params, dtype=dtype, download=False, noise_dtype=noise_dtype,
        load_dit_fn=functools.partial(load_dit_sharded, mesh=runtime.tp_mesh) if sharded else load_dit,
        is_main=runtime.is_group_main, broadcast=runtime.broadcast_from_main if sharded else None,
        compile=compile, load_vae_here=decode_on_all_ranks or runtime.is_group_main,
        decode=decode_latents_parallel if decode_on_all_ranks else None)
    if decode_on_all_ranks:
        parallelize_vae(pipe.vae, runtime)  # collective over the world: every rank gets here
    return pipe
