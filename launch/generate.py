"""mode=generate: the prompt loop. Load once, then each model group makes its share of the videos and its
first rank writes them; returns how many prompts failed, summed over the ranks.

A write that the outputs' filesystem refuses (full, over quota, read-only: k4flash.outputs.STORAGE_ERRNOS) is no
prompt's fault and would fail every next one: the run stops. Each model group ends the video it is making (and
writes it, if it fits), then stops before its next prompt; every rank leaves the mesh as after a finished batch,
and StorageStop gives rank 0's one `error:` line and exit status 1. A re-run after freeing space resumes."""
import logging
import sys
import time

from .batch import StorageStop, storage_stop_line
from .checks import check_weights, dit_params, read_jobs
from .config import shown_config
from .lifecycle import on_the_mesh
from .planning import choose, request_plan

log = logging.getLogger("k4flash")


def build_pipeline(cfg, runtime, dtype, weights_dir, offload="none", dit_offload="none"):
    """This process's pipeline: the library's own in one process, a rank's (parallel/) under a launcher."""
    # Heavy imports (diffusers, transformers) only past validation.
    from k4flash.pipeline import load_pipeline
    from parallel.rank_pipeline import load_rank_pipeline

    kwargs = dict(cache_dir=weights_dir, dtype=dtype, download=cfg.download, dit_params=dit_params(cfg),
                  compile=cfg.compile, text_encoder_offload=offload, quantize=cfg.dit.quantize,
                  fp8_skip=tuple(cfg.dit.fp8_skip), dit_offload=dit_offload)
    if runtime.distributed:
        return load_rank_pipeline(runtime.device, runtime=runtime, vae_parallel=cfg.vae.parallel, **kwargs)
    return load_pipeline(runtime.device, **kwargs)


def generate_from_config(cfg) -> int:
    """Check, choose the plan, load once, generate this rank's share of the jobs; returns how many failed."""
    # 1. Everything the user typed, checked before any weights load or process group forms.
    started = time.perf_counter()
    jobs = read_jobs(cfg)
    request = request_plan(cfg)
    from k4flash.devices import resolve_device, resolve_dtype  # torch: only past the checks that need none
    from parallel.plan import env_world

    device = resolve_device(cfg.device, env_world()[2])
    dtype = resolve_dtype(cfg.dtype, device)
    plan, offload, dit_offload = choose(cfg, request, jobs[0], device)
    batch = bool(cfg.prompts_file)
    todo = [job for job in jobs if cfg.overwrite or not batch or not job.is_complete()]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d prompts already done in %s", len(jobs) - len(todo), len(jobs), cfg.output_dir)
    if not todo:  # every rank sees the same files, so every rank stops here together
        return 0
    weights_dir = check_weights(cfg)

    # 2. Join the plan's mesh, with heartbeats so that a failure names the rank at fault.
    def body(runtime, health):
        failed, stopped = _generate(cfg, runtime, dtype, weights_dir, todo, health, offload, dit_offload)
        if batch and runtime.is_main and not stopped:
            done, wall_s = len(todo) - failed, time.perf_counter() - started
            log.info("batch finished in %.1f s: %d written, %d skipped (already done), %d failed; %.0f videos/hour",
                     wall_s, done, len(jobs) - len(todo), failed, 3600 * done / wall_s)
        return failed, stopped
    failed, stopped = on_the_mesh(cfg, plan, body)
    if stopped:  # raised off the mesh, on every rank alike: no rank takes another's ending for a failure
        raise StorageStop(storage_stop_line(stopped, jobs, batch))
    return failed


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


def _generate(cfg, runtime, dtype, weights_dir, todo, health, offload="none", dit_offload="none") -> tuple:
    """(prompts failed summed over the ranks, the refused write that stopped the run or None)."""
    from k4flash.outputs import storage_errno

    # 3. Load T5, DiT, VAE once (the checkpoint is checked before it materialises); with
    # text_encoder.offload=after_encode the DiT waits until T5 has encoded and is gone.
    clock = time.perf_counter()
    pipe = build_pipeline(cfg, runtime, dtype, weights_dir, offload, dit_offload)
    load_s = time.perf_counter() - clock
    log.info("loaded %s on %s (%s, %d rank(s): dp %d x ulysses %d x tp %d%s) in %.1f s", cfg.model.name,
             runtime.device, str(dtype).replace("torch.", ""), runtime.world_size, runtime.dp_size,
             runtime.ulysses_size, runtime.tp_size, " + sequence parallel" if runtime.sequence_parallel else "", load_s)
    metadata = {"model": cfg.model.name, "untrained": bool(cfg.model.untrained), "config": shown_config(cfg)}
    batch = bool(cfg.prompts_file)
    overwrite = cfg.overwrite or batch  # a batch job still pending may have a stale half: replace it
    written_log = _written_log(runtime)

    # 4. Each model group takes every dp_size-th job; its first rank decodes and writes. after_encode:
    # its first rank encodes all of them first, and T5 is freed before the DiT loads. dit.offload=during_decode:
    # the DiT leaves the GPU for each decode, to host memory, or for good before the group's last one.
    failed, stop = 0, Stop(runtime)
    mine = todo[runtime.dp_rank::runtime.dp_size]
    embeds = pipe.encode_prompts([job.prompt for job in mine]) if offload == "after_encode" else [None] * len(mine)
    for n, (job, text_embed) in enumerate(zip(mine, embeds), 1):
        if stop.agreed():  # a write was refused (here or on another group): no new prompt
            break
        if health is not None:
            health.mark(f"prompt {job.index}")
        try:
            generation = pipe.generate(job.prompt, job.time_length, job.width, job.height, job.seed,
                                       progress=cfg.progress, text_embed=text_embed, last=n == len(mine))
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
                if storage_errno(err) is not None:  # ... but a full disk stops it: every next one would fail too
                    failed += stop.record(err)
                    continue
                if not batch:
                    raise
                failed += _prompt_failed(job, err)
    failed = failed if pipe.is_group_main else 0
    # Every rank reaches the total (a store barrier) before the reason is read, so each reads the same one.
    return (health.total(failed) if health is not None else failed), stop.reason()


class Stop:
    """A write the outputs' filesystem refused, seen by this rank or, through the launcher's store, by another."""

    def __init__(self, runtime):
        from parallel.store import RunStore

        self.runtime, self.seen = runtime, None
        self.store = RunStore.launcher("batch") if runtime.distributed else None

    def record(self, err) -> int:
        """Record this rank's refused write (the first one of the run is the one reported); returns 1 (a failed
        prompt)."""
        self.seen = self.seen or str(err).splitlines()[0]
        if self.store is not None and self.store.add("stopped-claim", 1) == 1:
            self.store.set("stopped", self.seen)
        return 1

    def agreed(self) -> bool:
        """Whether this model group stops before its next prompt: one answer on each of its ranks (a rank stopping
        alone would leave its peers in a collective that never completes)."""
        seen = self.seen is not None or (self.store is not None and self.store.has("stopped"))
        return self.runtime.any_in_group(seen)

    def reason(self):
        """After every rank's total: the first refused write of the run (`cannot write <path>: <why>`), or None."""
        if self.store is None or not self.store.has("stopped-claim"):
            return self.seen
        return self.store.wait("stopped", 0.05, 30)  # set just after its claim


def _prompt_failed(job, err) -> int:
    log.error("prompt %d (%.60r) failed: %s: %s", job.index, job.prompt, type(err).__name__, err)
    return 1
