"""k4flash: fast, distributed inference for Kandinsky 4.0 T2V Flash.

The public facade. `get_T2V_pipeline` is the model card's call; it is also the one place
where a run under a multi-rank launcher (torchrun, `python -m torch.distributed.launch`:
WORLD_SIZE > 1) is routed to parallel/, which shards the DiT and splits the VAE decode.
The library modules beside this file are single-process and never import parallel/.
"""
import os

from .published import PUBLISHED_DIT_PARAMS

__version__ = "0.1.0"
__all__ = ["DiffusionTransformer3D", "PUBLISHED_DIT_PARAMS", "Kandinsky4T2VPipeline", "get_T2V_pipeline",
           "get_tiny_pipeline"]


def get_T2V_pipeline(device_map, resolution: int = 512, cache_dir="./weights/", dit_path=None,
                     text_encoder_path=None, tokenizer_path=None, vae_path=None, scheduler_path=None,
                     conf_path=None, **options):
    """The model card's entry point: load T5, the DiT and the VAE and return the pipeline.

    One process: `k4flash.pipeline.load_pipeline`. Under a launcher (WORLD_SIZE > 1): this
    rank's pipeline from `parallel.rank_pipeline.load_rank_pipeline` (joins the process group,
    every rank in one TP group unless the options tp=, ulysses=, sequence_parallel= say otherwise).
    If that call initialised the process group (the caller had not), the pipeline owns it:
    `pipe.close()` (or leaving a `with get_T2V_pipeline(...) as pipe:` block) destroys it, and
    interpreter exit does if close was not called; a group the caller initialised is left to the caller.
    `options` (keyword-only): dit_params, dtype, download, noise_dtype, compile, as `load_pipeline`
    documents them.
    """
    args = (device_map, resolution, cache_dir, dit_path, text_encoder_path, tokenizer_path, vae_path,
            scheduler_path, conf_path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.rank_pipeline import load_rank_pipeline
        return load_rank_pipeline(*args, **options)
    from .pipeline import load_pipeline
    return load_pipeline(*args, **options)


def get_tiny_pipeline(device_map="cpu", **options):
    """The untrained tiny stand-in (`model=tiny` on the command line) from Python, in one call.

    Builds the tiny weights in the published formats on first use (k4flash.tiny.ensure_tiny_weights:
    $K4FLASH_CACHE or ~/.cache/k4flash) and loads them like get_T2V_pipeline, launcher routing included.
    Its videos are noise, not the prompt: it exercises the real code path on any CPU.
    """
    from .tiny import TINY_DIT_PARAMS, ensure_tiny_weights

    options = {"dit_params": TINY_DIT_PARAMS, "download": False, **options}
    return get_T2V_pipeline(device_map, cache_dir=ensure_tiny_weights(), **options)


def __getattr__(name):
    # Lazy: importing k4flash (e.g. for the app's input checks) must not import torch or diffusers.
    if name == "DiffusionTransformer3D":
        from .dit import DiffusionTransformer3D
        return DiffusionTransformer3D
    if name == "Kandinsky4T2VPipeline":
        from .pipeline import Kandinsky4T2VPipeline
        return Kandinsky4T2VPipeline
    raise AttributeError(f"module 'k4flash' has no attribute {name!r}")
