"""What `run_inference_distil.py` does with its Hydra config: check, load, generate, write.

Every check that can fail on user input runs before any weights load, and a failure
is one line on stderr with exit status 2. The checks that need no torch run before torch,
transformers or diffusers is imported, so bad input is refused in about a second.
"""
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from k4flash.geometry import validate_offload, validate_request, validate_seed
from parallel.degrees import env_world, validate_plan_degrees, validate_world

from .batch import Job, read_prompts_file
from .config import unknown_keys

log = logging.getLogger("k4flash")


class UsageError(ValueError):
    """Bad configuration or input: reported as one line, exit status 2."""


# Ranks other than 0 neither create a Hydra run directory nor write .hydra/ or a log file, even when
# the user asks for them (hydra.run.dir=...): the job's one folder is rank 0's, never one per rank.
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


def check_writable(directory: Path, what: str) -> None:
    directory = directory.resolve()
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"{what} {directory}: {existing} is not a writable directory")


def plan_jobs(cfg) -> list:
    """Every video this run should produce, validated; raises UsageError/ValueError before anything loads."""
    problems = unknown_keys(cfg)
    if problems:
        raise UsageError(problems[0])
    defaults = dict(seed=cfg.seed, time_length=cfg.time_length, width=cfg.width, height=cfg.height)
    validate_seed(cfg.seed)
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
        from k4flash.tiny import ensure_tiny_weights
        if env_world()[0] == 0:
            log.warning("model=%s is an UNTRAINED stand-in built locally: the video is noise, not the prompt. "
                        "It exercises the real code path; use model=kandinsky4_flash with weights for real videos.",
                        cfg.model.name)
        return ensure_tiny_weights()
    return Path(cfg.weights_dir)


def check_weights(cfg) -> Path:
    """The weights folder, built (tiny) or checked for completeness before any process group or load.

    With downloads allowed and online, missing files are fetched later, on rank 0 only.
    """
    weights_dir = weights_dir_for(cfg)
    if cfg.model.builtin or not cfg.download or os.environ.get("HF_HUB_OFFLINE"):
        from k4flash.weights import resolve_weight_paths
        resolve_weight_paths(weights_dir, download=False)
    return weights_dir


def build_pipeline(cfg, runtime, dtype, weights_dir, offload="none"):
    """This process's pipeline: the library's own in one process, a rank's (parallel/) under a launcher."""
    # Heavy imports (diffusers, transformers) only past validation.
    from k4flash.pipeline import load_pipeline
    from parallel.rank_pipeline import load_rank_pipeline

    kwargs = dict(cache_dir=weights_dir, dtype=dtype, download=cfg.download,
                  dit_params=OmegaConf.to_container(cfg.model.dit_params), compile=cfg.compile,
                  text_encoder_offload=offload)
    if runtime.distributed:
        return load_rank_pipeline(runtime.device, runtime=runtime, vae_parallel=cfg.vae.parallel, **kwargs)
    return load_pipeline(runtime.device, **kwargs)


class DistributedFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it (exit status 3)."""


class Terminated(BaseException):
    """SIGTERM (the launcher or the scheduler stopping this rank): unwind like Ctrl-C, cleaning up."""


_UNWINDING = threading.Event()  # set while a failure is being reported: a late SIGTERM must not cut it short


def _raise_terminated(signum, frame):
    if not _UNWINDING.is_set():
        _UNWINDING.set()
        raise Terminated(f"received {signal.Signals(signum).name}")


PLANS = ("manual", "auto")
MODES = ("generate", "serve")


def validate_parallel(cfg) -> tuple:
    """(tp, ulysses, sequence_parallel) as given (None where not), checked against the world size and the model's
    widths, before torch is imported."""
    world = env_world()[1]
    p = cfg.parallel
    try:
        if p.plan not in PLANS:
            raise ValueError(f"parallel.plan={p.plan!r}: allowed values are {list(PLANS)}")
        validate_offload(cfg.text_encoder.offload, allow_auto=True)
        ulysses = 1 if p.ulysses is None else p.ulysses
        tp = validate_world(world, p.tp if p.plan == "manual" or p.tp is not None else 1, ulysses)
        if tp > 1 or ulysses > 1:
            validate_plan_degrees(OmegaConf.to_container(cfg.model.dit_params), tp, ulysses)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if p.plan == "manual":
        return tp, ulysses, bool(p.sequence_parallel)
    return p.tp, p.ulysses, p.sequence_parallel


def choose_parallel(cfg, given: tuple, jobs, device) -> tuple:
    """(tp, ulysses, sequence_parallel, text-encoder offload) for this run.

    parallel.plan=auto: the fastest plan the cost model predicts for the first video that fits the GPUs'
    memory, among those that agree with what was given; logged with its prediction (rank 0).
    text_encoder.offload=auto: the first of none, after_encode, cpu with which that plan fits (none on CPU).
    """
    offload = cfg.text_encoder.offload
    if cfg.parallel.plan != "auto" and (offload != "auto" or device.type != "cuda"):
        return (*given, "none" if offload == "auto" else offload)
    from k4flash.geometry import latent_shape
    from parallel.plan import OFFLOADS, Plan, choose_plan

    world = env_world()[1]
    memory_gb = cfg.parallel.gpu_memory_gb
    if memory_gb is None:
        import torch
        memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" \
            else float("inf")
    params = OmegaConf.to_container(cfg.model.dit_params)
    job = jobs[0]
    latent = latent_shape(job.time_length, job.height, job.width)[:3]
    tp, ulysses, sp = given
    if cfg.parallel.plan != "auto":  # the plan is fixed: only the offload is chosen
        ulysses = ulysses or 1
        fixed = Plan(tp, ulysses, bool(sp), world // (tp * ulysses))
        tp, sp = fixed.tp, fixed.sequence_parallel
    try:
        plan, offload, rows = choose_plan(params, world, memory_gb, latent_fhw=latent, allowed=lambda p: (
            (tp is None or p.tp == tp) and (ulysses is None or p.ulysses == ulysses)
            and (sp is None or p.sequence_parallel == sp)), offloads=OFFLOADS if offload == "auto" else (offload,))
    except ValueError as err:
        if cfg.parallel.plan == "auto":
            raise UsageError(str(err)) from None
        log.warning("text_encoder.offload=auto: the memory model fits no setting with this plan (%s); using cpu, "
                    "the smallest", err)
        return (*given, "cpu")
    row = next(r for r in rows if r["plan_object"] == plan and r["offload"] == offload)
    if env_world()[0] == 0:
        log.info("%s on %d GPU(s), %s: %s, text_encoder.offload=%s (predicted %.2f s per video on H100s, %.1f GB "
                 "per GPU; %d choices considered)", "parallel.plan=auto" if cfg.parallel.plan == "auto" else
                 "text_encoder.offload=auto", world, "no memory limit" if memory_gb == float("inf") else
                 f"{memory_gb:g} GB each", plan, offload, row["end_to_end_s"], row["gpu_memory_gb"], len(rows))
    return plan.tp, plan.ulysses, plan.sequence_parallel, offload


def generate_from_config(cfg) -> int:
    """Plan, load once, generate this rank's share of the jobs; returns how many failed (all ranks)."""
    # 1. Everything the user typed, checked before any weights load or process group forms.
    started = time.perf_counter()
    jobs = plan_jobs(cfg)
    given = validate_parallel(cfg)
    from k4flash.devices import resolve_device, resolve_dtype  # torch: only past the checks that need none

    device = resolve_device(cfg.device, env_world()[2])
    dtype = resolve_dtype(cfg.dtype, device)
    tp, ulysses, sequence_parallel, offload = choose_parallel(cfg, given, jobs, device)
    batch = bool(cfg.prompts_file)
    todo = [job for job in jobs if cfg.overwrite or not batch or not job.is_complete()]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d prompts already done in %s", len(jobs) - len(todo), len(jobs), cfg.output_dir)
    if not todo:  # every rank sees the same files, so every rank stops here together
        return 0
    # Before the process group: transformers writes files on rank 0 only once one exists.
    weights_dir = check_weights(cfg)

    # 2. Join the (dp, ulysses, tp) mesh, with heartbeats so that a failure names the rank at fault.
    def body(runtime, health):
        failed = _generate(cfg, runtime, dtype, weights_dir, todo, health, offload)
        if batch and runtime.is_main:
            done, wall_s = len(todo) - failed, time.perf_counter() - started
            log.info("batch finished in %.1f s: %d written, %d skipped (already done), %d failed; %.0f videos/hour",
                     wall_s, done, len(jobs) - len(todo), failed, 3600 * done / wall_s)
        return failed
    return _on_the_mesh(cfg, (tp, ulysses, sequence_parallel), body)


def _on_the_mesh(cfg, degrees, body, grace_s=None):
    """body(runtime, health) on this rank of the (dp, ulysses, tp) mesh, heartbeats watching; failures of other
    ranks are re-raised as DistributedFailure naming the culprit (rank 0)."""
    from parallel.health import GRACE_S, RankHealth
    from parallel.runtime import init_runtime

    tp, ulysses, sequence_parallel = degrees
    runtime = init_runtime(cfg.device, cfg.parallel.timeout_s, tp=tp, ulysses=ulysses,
                           sequence_parallel=sequence_parallel)
    health = None
    if runtime.distributed:
        from k4flash.outputs import discard_in_flight
        health = RankHealth.start(runtime.rank, runtime.world_size, timeout_s=cfg.parallel.timeout_s,
                                  watch=runtime.peers(), on_exit=discard_in_flight, grace_s=grace_s or GRACE_S)
    try:
        return body(runtime, health)
    except BaseException as err:
        if health is None:
            raise
        _UNWINDING.set()  # torchrun SIGTERMs the survivors when a rank dies: finish naming it first
        health.report(err)
        if not health.claim():  # the heartbeat thread is already ending the process with its verdict
            threading.Event().wait()
        if runtime.is_main and _is_distributed_failure(err):
            raise DistributedFailure(health.explain(err)) from err
        raise
    finally:
        if health is not None:
            health.stop()


def serve_from_config(cfg) -> int:
    """mode=serve: check, load once, serve until SIGTERM / Ctrl-C (k4flash/app/serve.py); returns 0."""
    # 1. Everything typed, checked before any weights load or process group forms.
    problems = unknown_keys(cfg)
    if problems:
        raise UsageError(problems[0])
    validate_serve(cfg)
    given = validate_parallel(cfg)
    from types import SimpleNamespace

    from k4flash.devices import resolve_device, resolve_dtype

    device = resolve_device(cfg.device, env_world()[2])
    dtype = resolve_dtype(cfg.dtype, device)
    typical = SimpleNamespace(time_length=cfg.time_length, width=cfg.width, height=cfg.height)
    tp, ulysses, sequence_parallel, offload = choose_parallel(cfg, given, [typical], device)
    if cfg.text_encoder.offload == "auto":  # a server encodes all day: T5 stays, on the CPU where memory is short
        offload = "none" if offload == "none" else "cpu"
    weights_dir = check_weights(cfg)

    def body(runtime, health):
        from . import serve
        from parallel.health import connect_store, store_prefix

        pipe = build_pipeline(cfg, runtime, dtype, weights_dir, offload)
        channel = serve.Channel(connect_store(), store_prefix()) if runtime.distributed else \
            serve.Channel(serve.LocalStore(), "")
        serve.serve(cfg, runtime, pipe, health, channel, serve.model_info(cfg, runtime, dtype))
        return 0
    return _on_the_mesh(cfg, (tp, ulysses, sequence_parallel), body, grace_s=cfg.serve.drain_timeout_s + 10)


def validate_serve(cfg) -> None:
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


def _is_distributed_failure(err: BaseException) -> bool:
    """What rank 0 reports as a multi-rank failure (exit 3, the culprit named): a broken collective, SIGTERM,
    or an error on a rank that is not bad input, a failed prompt (non-finite latents) or Ctrl-C."""
    from parallel.health import is_collective_failure

    if is_collective_failure(err) or isinstance(err, Terminated):
        return True
    return not isinstance(err, INPUT_ERRORS + (FloatingPointError, KeyboardInterrupt, DistributedFailure))


def _written_log(runtime) -> logging.Logger:
    """Where 'wrote …' lines go: every output is logged once, by the first rank of the group that wrote it
    (only rank 0 logs anything else)."""
    written = logging.getLogger("k4flash.written")
    if runtime.is_group_main and not runtime.is_main and not written.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][k4flash][INFO] - rank {runtime.rank}: %(message)s"))
        written.addHandler(handler)
        written.setLevel(logging.INFO)
        written.propagate = False
    return written


def _generate(cfg, runtime, dtype, weights_dir, todo, health, offload="none") -> int:
    # 3. Load T5, DiT, VAE once (the checkpoint is checked before it materialises); with
    # text_encoder.offload=after_encode the DiT waits until T5 has encoded and is gone.
    clock = time.perf_counter()
    pipe = build_pipeline(cfg, runtime, dtype, weights_dir, offload)
    load_s = time.perf_counter() - clock
    log.info("loaded %s on %s (%s, %d rank(s): dp %d x ulysses %d x tp %d%s) in %.1f s", cfg.model.name,
             runtime.device, str(dtype).replace("torch.", ""), runtime.world_size, runtime.dp_size,
             runtime.ulysses_size, runtime.tp_size, " + sequence parallel" if runtime.sequence_parallel else "", load_s)
    metadata = {"model": cfg.model.name, "untrained": bool(cfg.model.untrained),
                "config": OmegaConf.to_container(cfg, resolve=True)}
    batch = bool(cfg.prompts_file)
    overwrite = cfg.overwrite or batch  # a batch job still pending may have a stale half: replace it
    written_log = _written_log(runtime)

    # 4. Each model group takes every dp_size-th job; its first rank decodes and writes. after_encode:
    # its first rank encodes all of them first, and T5 is freed before the DiT loads.
    failed = 0
    mine = todo[runtime.dp_rank::runtime.dp_size]
    embeds = pipe.encode_prompts([job.prompt for job in mine]) if offload == "after_encode" else [None] * len(mine)
    for job, text_embed in zip(mine, embeds):
        if health is not None:
            health.mark(f"prompt {job.index}")
        try:
            generation = pipe.generate(job.prompt, job.time_length, job.width, job.height, job.seed,
                                       progress=cfg.progress, text_embed=text_embed)
        except FloatingPointError as err:  # non-finite latents: every rank of the group has the same ones
            if not batch:
                raise
            failed += _prompt_failed(job, err)
            continue
        # Anything else raised in generate() fails the run: on a TP group one rank may have raised between
        # collectives that its peers are still in, and its next collective would pair with theirs.
        if pipe.is_group_main:
            try:  # after every collective of the prompt: a failure here is this prompt's alone
                generation.timings["load_s"] = load_s
                written = pipe.write_outputs(generation, job.save_path, save_latents=cfg.save_latents,
                                             overwrite=overwrite, extra_metadata={**metadata, "index": job.index})
                written_log.info("wrote %s (%s)", written,
                                 ", ".join(f"{k} {v:.2f}" for k, v in generation.timings.items()))
            except (OSError, ValueError) as err:  # one unwritable output must not sink the batch
                if not batch:
                    raise
                failed += _prompt_failed(job, err)
    failed = failed if pipe.is_group_main else 0
    return health.total(failed) if health is not None else failed


def _prompt_failed(job, err) -> int:
    log.error("prompt %d (%.60r) failed: %s: %s", job.index, job.prompt, type(err).__name__, err)
    return 1


INPUT_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError)
EXIT_INPUT, EXIT_FAILED, EXIT_DISTRIBUTED, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 3, 130, 143


def _shutdown_if_started() -> None:
    """Destroy the process group if one was formed; bad input never imported parallel/ (nor torch) to check."""
    if "parallel.runtime" in sys.modules:
        from parallel.runtime import shutdown_runtime
        shutdown_runtime()


def run(cfg) -> None:
    """Run the configured generation(s) and exit with a status that says what happened.

    0 done · 1 a prompt failed (batch: the others are written; non-finite latents) · 2 bad
    input, before anything loads · 3 another rank died, hung or failed (rank 0 names it)
    · 130 Ctrl-C · 143 SIGTERM. Every failure is one `error:` line from rank 0, finished
    outputs are kept, nothing half-written is left, and the process group is destroyed on
    every path. Under torchrun every rank runs this; each model group's first rank writes.
    """
    is_main = env_world()[0] == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    on_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    if on_main_thread:
        _UNWINDING.clear()
        signal.signal(signal.SIGTERM, _raise_terminated)
    code, message = 0, None
    try:
        if cfg.mode not in MODES:
            raise UsageError(f"mode={cfg.mode!r}: allowed values are {list(MODES)}")
        failed = serve_from_config(cfg) if cfg.mode == "serve" else generate_from_config(cfg)
        if failed:
            code, message = EXIT_FAILED, f"{failed} prompt(s) failed; re-run the same command to retry them"
    except INPUT_ERRORS as err:
        code, message = EXIT_INPUT, str(err)
    except FloatingPointError as err:  # k4flash.sampler.NonFiniteLatentsError: the latents hold NaN/inf
        code, message = EXIT_FAILED, str(err)
    except DistributedFailure as err:
        code, message = EXIT_DISTRIBUTED, f"distributed run failed: {err}"
    except KeyboardInterrupt:
        code, message = EXIT_SIGINT, "interrupted; finished outputs are kept, re-run the same command to resume"
    except Terminated as err:
        code, message = EXIT_SIGTERM, f"terminated ({err}); finished outputs are kept, re-run to resume"
    except Exception as err:
        from parallel.health import is_collective_failure

        if not is_collective_failure(err):
            raise
        code, message = EXIT_DISTRIBUTED, f"distributed run failed: {str(err).splitlines()[0]}"
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _shutdown_if_started()
    if code:
        if is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        elif code == EXIT_INPUT:
            # Every rank refuses bad input at once; the first to exit makes torchrun SIGTERM the others, which
            # would cut rank 0 off before its line. The other ranks leave rank 0 a moment to print it.
            time.sleep(1.0)
        sys.exit(code)
