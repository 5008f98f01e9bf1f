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

from parallel.runtime import env_world, init_runtime, resolve_device, shutdown_runtime, validate_world

from .batch import Job, read_prompts_file
from .geometry import validate_request
from .weights import CheckpointError

log = logging.getLogger("k4flash")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2."""


# Ranks other than 0 neither create a Hydra run directory nor write .hydra/ or a log file:
# the job's one directory is rank 0's (or the SLURM job id's), never each rank's clock.
NON_MAIN_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                           "hydra/hydra_logging=none")


def prepare_argv(argv: list) -> None:
    """Fit a launcher's argv for Hydra: drop torch.distributed.launch's flag, quiet non-main ranks."""
    strip_launcher_args(argv)
    if int(os.environ.get("RANK", "0")) != 0 and not any(a.startswith("--") for a in argv[1:]):
        argv.extend(NON_MAIN_RANK_OVERRIDES)


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




def check_writable(directory: Path, what: str) -> None:
    directory = directory.resolve()
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{what} {directory}: {existing} is not a writable directory")


def plan_jobs(cfg) -> list:
    """Every video this run should produce, validated; raises UsageError/ValueError before anything loads."""
    defaults = dict(seed=cfg.seed, time_length=cfg.time_length, width=cfg.width, height=cfg.height)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UsageError(f"seed={cfg.seed!r} must be a non-negative integer")
    if cfg.prompts_file:
        jobs = read_prompts_file(cfg.prompts_file, defaults, cfg.output_dir)
        check_writable(Path(cfg.output_dir), "output_dir")
        return jobs
    validate_request(cfg.prompt, cfg.time_length, cfg.height, cfg.width)
    job = Job(0, cfg.prompt, save_path=Path(cfg.save_path), **defaults)
    if job.output_path.exists() and not cfg.overwrite:
        raise UsageError(f"save_path {job.output_path} already exists; pass overwrite=true to replace it")
    check_writable(job.output_path.parent, "save_path")
    return [job]


def weights_dir_for(cfg) -> Path:
    if cfg.model.builtin:
        from .tiny import ensure_tiny_weights
        if env_world()[0] == 0:
            log.warning("model=%s is an UNTRAINED stand-in built locally: the video is noise, not the prompt. "
                        "It exercises the real code path; use model=kandinsky4_flash with weights for real videos.",
                        cfg.model.name)
        return ensure_tiny_weights()
    return Path(cfg.weights_dir)


def build_pipeline(cfg, runtime, dtype):
    from .pipeline import get_T2V_pipeline  # heavy imports (diffusers, transformers) only past validation

    kwargs = dict(cache_dir=weights_dir_for(cfg), dtype=dtype, download=cfg.download,
                  dit_params=OmegaConf.to_container(cfg.model.dit_params))
    if runtime.distributed:
        from parallel.build import get_parallel_T2V_pipeline
        return get_parallel_T2V_pipeline(runtime.device, runtime=runtime, vae_parallel=cfg.vae.parallel, **kwargs)
    return get_T2V_pipeline(runtime.device, **kwargs)


def generate_from_config(cfg) -> int:
    """Plan, load once, generate this rank's share of the jobs; returns how many failed (all ranks)."""
    # 1. Everything the user typed, checked before any weights load or process group forms.
    jobs = plan_jobs(cfg)
    validate_world(env_world()[1], cfg.parallel.tp)
    device = resolve_device(cfg.device, env_world()[2])
    dtype = resolve_dtype(cfg.dtype, device)
    batch = bool(cfg.prompts_file)
    overwrite = cfg.overwrite or batch  # a batch job still pending may have a stale half: replace it
    todo = [job for job in jobs if cfg.overwrite or not batch or not job.is_complete()]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d prompts already done in %s", len(jobs) - len(todo), len(jobs), cfg.output_dir)
    if not todo:  # every rank sees the same files, so every rank stops here together
        return 0

    # 2. Join the (dp, tp) mesh; load T5, DiT, VAE once (the checkpoint is checked before it materialises).
    runtime = init_runtime(cfg.device, cfg.parallel.timeout_s, tp=cfg.parallel.tp)
    clock = time.perf_counter()
    pipe = build_pipeline(cfg, runtime, dtype)
    load_s = time.perf_counter() - clock
    log.info("loaded %s on %s (%s, %d rank(s): dp %d x tp %d) in %.1f s", cfg.model.name, runtime.device,
             str(dtype).replace("torch.", ""), runtime.world_size, runtime.dp_size, runtime.tp_size, load_s)
    metadata = {"model": cfg.model.name, "untrained": bool(cfg.model.untrained),
                "config": OmegaConf.to_container(cfg, resolve=True)}

    # 3. Each TP group takes every dp_size-th job; its first rank decodes and writes.
    failed = 0
    for job in todo[runtime.dp_rank::runtime.dp_size]:
        try:
            generation = pipe.generate(job.prompt, job.time_length, job.width, job.height, job.seed,
                                       progress=cfg.progress)
            if pipe.is_main:
                generation.timings["load_s"] = load_s
                written = pipe.write_outputs(generation, job.save_path, save_latents=cfg.save_latents,
                                             overwrite=overwrite, extra_metadata={**metadata, "index": job.index})
                log.info("wrote %s (%s)", written, ", ".join(f"{k} {v:.2f}" for k, v in generation.timings.items()))
        except (torch.distributed.DistError, KeyboardInterrupt):
            raise  # a rank is gone or the user stopped us: not a per-prompt failure
        except Exception as err:  # one bad prompt must not sink the batch
            if not batch:
                raise
            failed += 1
            log.error("prompt %d (%.60r) failed: %s: %s", job.index, job.prompt, type(err).__name__, err)
    return runtime.sum_over_ranks(failed if pipe.is_main else 0)


def run(cfg) -> None:
    """Run the configured generation(s); bad input exits 2 with one line, failed prompts exit 1.

    Under torchrun every rank runs this; rank 0 logs and prints errors, each TP group's
    first rank writes its videos.
    """
    is_main = env_world()[0] == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        failed = generate_from_config(cfg)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        if is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_runtime()
    if failed:
        if is_main:
            print(f"error: {failed} prompt(s) failed; re-run the same command to retry them", file=sys.stderr)
        sys.exit(1)
