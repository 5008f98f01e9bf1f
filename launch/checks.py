"""Everything a run's config can get wrong, checked once, before any weights load or process group forms.

A failure is a `UsageError` (one line, exit status 2). Nothing here imports torch, transformers or
diffusers, so bad input is refused in about a second; `check_weights` is the one check that may
build something (the tiny stand-in's weights, once).
"""
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from k4flash.ffmpeg import mp4_encoder_problem
from k4flash.geometry import validate_request, validate_seed
from k4flash.output_paths import output_files
from parallel.plan import env_world

from .batch import Job, read_prompts_file
from .config import unknown_keys

log = logging.getLogger("k4flash")
MODES = ("generate", "serve")


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2."""


def check_config(cfg) -> None:
    """The keys and the mode: an unknown key however spelled (`+time_lenght=3` too), an unknown mode."""
    if cfg.mode not in MODES:
        raise UsageError(f"mode={cfg.mode!r}: allowed values are {list(MODES)}")
    problems = unknown_keys(cfg)
    if problems:
        raise UsageError(problems[0])


def check_writable(directory: Path, what: str) -> None:
    directory = directory.resolve()
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{what} {directory}: {existing} is not a writable directory")


def read_jobs(cfg) -> list:
    """Every video this run should produce (one, or a prompts file's), each request checked."""
    defaults = dict(seed=cfg.seed, time_length=cfg.time_length, width=cfg.width, height=cfg.height)
    validate_seed(cfg.seed)
    if cfg.prompts_file:
        jobs = read_prompts_file(cfg.prompts_file, defaults, cfg.output_dir)
        check_writable(Path(cfg.output_dir), "output_dir")
        check_mp4_encoder(jobs)
        return jobs
    validate_request(cfg.prompt, cfg.time_length, cfg.height, cfg.width)
    job = Job(0, cfg.prompt, save_path=Path(cfg.save_path), **defaults)
    existing = [p for p in output_files(job.save_path, job.time_length, cfg.save_latents) if p.exists()]
    if existing and not cfg.overwrite:  # every file the run would write, not only the video: nothing half-written
        raise UsageError(f"{existing[0]} already exists (an output of save_path {job.save_path}); pass "
                         "overwrite=true to replace it")
    check_writable(job.output_path.parent, "save_path")
    check_mp4_encoder([job])
    return [job]


def check_mp4_encoder(jobs) -> None:
    """A video needs an ffmpeg (k4flash/ffmpeg.py): without one, refuse before loading rather than after the DiT."""
    problem = mp4_encoder_problem() if any(job.time_length > 0 for job in jobs) else None
    if problem:
        raise UsageError(problem)


def check_serve(cfg) -> None:
    """mode=serve's settings."""
    s = cfg.serve
    if cfg.text_encoder.offload == "after_encode":
        raise UsageError("text_encoder.offload=after_encode frees T5 after the first prompts; a server needs it for "
                         "every request: use none, cpu or auto")
    if isinstance(s.port, bool) or not isinstance(s.port, int) or not 0 < s.port < 65536:
        raise UsageError(f"serve.port={s.port!r} must be a port number, 1-65535")
    for name in ("queue_size", "max_body_bytes"):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"serve.{name}={value!r} must be a positive whole number")
    if not s.drain_timeout_s > 0:
        raise UsageError(f"serve.drain_timeout_s={s.drain_timeout_s!r} must be positive")
    check_writable(Path(s.output_dir), "serve.output_dir")
    if mp4_encoder_problem():  # a request for a video would fail mid-generation and end the job (exit 3)
        raise UsageError(f"mode=serve: {mp4_encoder_problem()}")
    if env_world()[0] == 0:  # rank 0 listens
        check_listen(s.host, s.port)
        check_exposure(s.host, s.api_key or os.environ.get("K4FLASH_API_KEY"), s.allow_unauthenticated)


def check_exposure(host: str, api_key, allow_unauthenticated: bool) -> None:
    """A server other machines can reach needs a key, unless that is asked for in so many words."""
    import ipaddress
    import socket

    if api_key or allow_unauthenticated:
        return
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UsageError(f"serve.host={host} is reachable from other machines and no API key is set: set "
                         "serve.api_key (or $K4FLASH_API_KEY), or serve.allow_unauthenticated=true to serve it open")


def check_listen(host: str, port: int) -> None:
    """That the server can listen on host:port, found now rather than after minutes of loading: bound and
    released at once, with SO_REUSEADDR as uvicorn binds (a port in TIME_WAIT is free, one with a listener not)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"serve.host={host!r} is not an address this machine can resolve ({err})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise UsageError(f"serve.port={port} on serve.host={host}: cannot listen there ({err.strerror}); "
                             "choose a free port, or an address of this machine") from None


def dit_params(cfg) -> dict:
    return OmegaConf.to_container(cfg.model.dit_params)


def check_weights(cfg) -> Path:
    """The weights folder, built (tiny) or checked for completeness, its DiT file for truncation and corruption.

    With downloads allowed and online, missing files are fetched later, on rank 0 only (parallel/fetch.py).
    Run before the process group forms: transformers writes files on rank 0 only once one exists.
    """
    if cfg.model.builtin:
        from k4flash.tiny import ensure_tiny_weights
        if env_world()[0] == 0:
            log.warning("model=%s is an UNTRAINED stand-in built locally: the video is noise, not the prompt. "
                        "It exercises the real code path; use model=kandinsky4_flash with weights for real videos.",
                        cfg.model.name)
        weights_dir = ensure_tiny_weights()
    else:
        weights_dir = Path(cfg.weights_dir)
    if cfg.model.builtin or not cfg.download or os.environ.get("HF_HUB_OFFLINE"):
        from k4flash.weights import resolve_weight_paths
        resolve_weight_paths(weights_dir, download=False)
    from k4flash.checkpoint_check import check_dit_checkpoint
    from k4flash.published import DIT_FILENAME
    # A truncated or corrupt DiT file here (the .safetensors copy the loader prefers, with dit.quantize=fp8 the FP8
    # conversion too) is bad input on every rank alike, now: not an error on some rank mid-load, after the process
    # group formed (k4flash/checkpoint_check.py reads headers only: milliseconds).
    check_dit_checkpoint(weights_dir / DIT_FILENAME, cfg.dit.quantize)
    return weights_dir
