"""What `run_inference_distil.py` does with its Hydra config: check, load, generate, write.

Every check that can fail on user input runs before any weights load, and a failure
is one line on stderr with exit status 2.
"""
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from parallel.runtime import resolve_device, shutdown_runtime

from .geometry import validate_request
from .weights import CheckpointError

log = logging.getLogger("k4flash")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2."""


def strip_launcher_args(argv: list) -> None:
    """Remove `--local-rank=N` / `--local_rank N` (torch.distributed.launch) from argv, keeping LOCAL_RANK."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local-rank", "--local_rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                del argv[i:i + 2]
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                del argv[i]
                break
        else:
            i += 1


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UsageError(f"dtype={name!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_output_path(save_path: Path, time_length: int, overwrite: bool) -> Path:
    target = save_path.with_suffix(".png") if time_length == 0 else save_path
    if target.exists() and not overwrite:
        raise UsageError(f"save_path {target} already exists; pass overwrite=true to replace it")
    parent = target.parent.resolve()
    existing = next(p for p in [parent, *parent.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise UsageError(f"save_path {target}: directory {existing} is not writable")
    return target


def weights_dir_for(cfg) -> Path:
    if cfg.model.builtin:
        from .tiny import ensure_tiny_weights
        log.warning("model=%s is an UNTRAINED stand-in built locally: the video is noise, not the prompt. "
                    "It exercises the real code path; use model=kandinsky4_flash with weights for real videos.",
                    cfg.model.name)
        return ensure_tiny_weights()
    return Path(cfg.weights_dir)


def generate_from_config(cfg) -> Path:
    # 1. Everything the user typed, checked before any weights load.
    validate_request(cfg.prompt, cfg.time_length, cfg.height, cfg.width)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UsageError(f"seed={cfg.seed!r} must be a non-negative integer")
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(cfg.dtype, device)
    save_path = Path(cfg.save_path)
    check_output_path(save_path, cfg.time_length, cfg.overwrite)

    # 2. Load T5, DiT, VAE (the checkpoint's keys and shapes are checked before it materialises).
    from .pipeline import get_T2V_pipeline  # heavy imports (diffusers, transformers) only past validation
    clock = time.perf_counter()
    pipe = get_T2V_pipeline(device, cache_dir=weights_dir_for(cfg), dtype=dtype, download=cfg.download,
                            dit_params=OmegaConf.to_container(cfg.model.dit_params))
    load_s = time.perf_counter() - clock
    log.info("loaded %s on %s (%s) in %.1f s", cfg.model.name, device, str(dtype).replace("torch.", ""), load_s)

    # 3. Generate (every rank runs its DiT shard); only the main rank decodes and writes.
    generation = pipe.generate(cfg.prompt, cfg.time_length, cfg.width, cfg.height, cfg.seed, progress=cfg.progress)
    if not pipe.is_main:
        return None
    generation.timings["load_s"] = load_s
    written = pipe.write_outputs(generation, save_path, save_latents=cfg.save_latents, overwrite=cfg.overwrite,
                                 extra_metadata={"model": cfg.model.name, "untrained": bool(cfg.model.untrained),
                                                 "config": OmegaConf.to_container(cfg, resolve=True)})
    log.info("wrote %s (%s)", written, ", ".join(f"{k} {v:.2f}" for k, v in generation.timings.items()))
    return written


def run(cfg) -> None:
    """Run one generation; bad input exits with status 2 and one line naming the problem.

    Under torchrun every rank runs this; only rank 0 logs, prints errors and writes.
    """
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        generate_from_config(cfg)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        if is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_runtime()
