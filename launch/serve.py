"""`mode=serve`: the model stays loaded across the ranks and takes requests over an OpenAI-style videos API.

    torchrun --nproc-per-node 8 run_inference_distil.py mode=serve serve.port=8000

Rank 0 runs the HTTP server (launch/api.py: FastAPI on uvicorn, in a thread of its own, so generation
never blocks it) and the scheduler's thread (launch/scheduler.py). Each model group (ulysses × tp ranks) takes
one video at a time; data-parallel groups work in parallel. Work, progress and results travel
through the launcher's store, outside any collective. Records and outputs live in
`serve.output_dir` (launch/videos.py), which every group's first rank must be able to write.

A cancel stops a video at a step boundary that the group's ranks agree on (Runtime.any_in_group).
SIGTERM or Ctrl-C: new work gets 503, the videos in progress finish (within serve.drain_timeout_s)
and are written, queued ones are marked failed, and every rank exits 0.
"""
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from .api import make_app
from .checks import UsageError, check_serve, check_weights
from .config import shown_config
from .lifecycle import on_the_mesh
from .planning import choose, request_plan
from .progress import StageTimes, cost_model_predictor, stage_seconds
from .scheduler import Channel, Scheduler
from .videos import VideoRecords

log = logging.getLogger("k4flash")


def _serve_http(app, host: str, port: int):
    """uvicorn in a thread of its own (no signal handlers: the main thread's are the server's)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, name="k4flash-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:  # taken since check_listen looked
        raise UsageError(f"serve.port={port} on serve.host={host}: could not listen there (in use, or not an "
                         "address of this machine)")
    return server, thread


class Cancelled(Exception):
    """POST /v1/videos/{id}/cancel, agreed by every rank of the group at the same step boundary."""


def work(pipe, runtime, channel: Channel, output_dir: Path, save_latents: bool, metadata: dict, health=None):
    """Every rank: take this group's jobs from the store until told to stop; the group's first rank reports
    each stage and writes."""
    group, n = runtime.dp_rank, 0
    while True:
        job = channel.wait_job(group, n)
        n += 1
        if job.get("stop"):
            return
        video_id = job["id"]
        if health is not None:
            health.mark(f"video {video_id}")
        main = pipe.is_group_main
        stages = []

        def report(stage, step):
            stages.append([stage, step])
            channel.set_stages(video_id, {"stages": stages, "group": group, **gpu_memory(runtime.device)})

        def on_stage(stage, step):
            if main:
                report(stage, step)
            # Only the group's first rank reads the store; all take its answer, so all stop at this boundary
            # (one rank stopping alone would leave the others in a collective that never completes).
            if runtime.any_in_group(main and channel.cancel_requested(video_id)):
                raise Cancelled(stage, step)
        try:
            generation = pipe.generate(job["prompt"], job["time_length"], job["width"], job["height"], job["seed"],
                                       progress=False, on_stage=on_stage)
        except Cancelled as stop:  # nothing was written; the group takes the next video
            if main:
                channel.send_result(video_id, dict(status="cancelled", completed_at=int(time.time()),
                                                   stage=stop.args[0], step=stop.args[1]))
            continue
        except (FloatingPointError, ValueError) as err:  # the same on every rank of the group: it goes on
            runtime.barrier_group()
            if main:
                channel.send_result(video_id, dict(status="failed", error={
                    "code": "generation_failed", "message": f"{type(err).__name__}: {err}".splitlines()[0]}))
            continue
        if main:
            report("writing", len(pipe.schedule.timesteps))
            clock = time.perf_counter()
            try:
                written = pipe.write_outputs(generation, output_dir / f"{video_id}.mp4", save_latents=save_latents,
                                             overwrite=True, extra_metadata=metadata)
                channel.send_result(video_id, dict(
                    status="completed", completed_at=int(time.time()), file=str(written), rank=runtime.rank,
                    stage_seconds=stage_seconds(generation.timings, time.perf_counter() - clock)))
            except (OSError, ValueError) as err:
                channel.send_result(video_id, dict(status="failed", error={"code": "write_failed",
                                                                           "message": str(err).splitlines()[0]}))


def gpu_spec(device):
    """The cost model's GPU for this device when it has one that fits (an H100 or H200), else None: then its
    figures give the stages' proportions only (launch/progress.py)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    from parallel.cost import H100_SXM

    name = torch.cuda.get_device_name(device)
    return H100_SXM if "H100" in name or "H200" in name else None


def gpu_memory(device) -> dict:
    """{"gpu_memory": {in_use, peak}} in bytes on a CUDA device, for /metrics; {} elsewhere."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return {}
    return {"gpu_memory": {"in_use": torch.cuda.memory_allocated(device),
                           "peak": torch.cuda.max_memory_allocated(device)}}


def serve(cfg, runtime, pipe, health, channel: Channel, model_info: dict) -> None:
    """This rank's part of the server: rank 0 also runs the HTTP server and the scheduler."""
    output_dir = Path(cfg.serve.output_dir)
    metadata = {"model": cfg.model.name, "untrained": bool(cfg.model.untrained)}
    http = scheduler = None

    def drain(signum, frame):  # SIGTERM / Ctrl-C: finish what runs, then stop (rank 0 decides when)
        if scheduler is not None:
            scheduler.draining.set()
    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    if runtime.is_main:
        from .metrics import Metrics

        records = VideoRecords(output_dir)
        predict = cost_model_predictor(OmegaConf.to_container(cfg.model.dit_params), runtime.tp_size,
                                       runtime.ulysses_size, runtime.sequence_parallel, gpu_spec(runtime.device))
        stage_times = StageTimes(predict, absolute=gpu_spec(runtime.device) is not None)
        metrics = Metrics(lambda: len(scheduler.queue), lambda: len(scheduler.busy))
        scheduler = Scheduler(records, channel, runtime.dp_size, cfg.serve.queue_size, stage_times, metrics)
        api_key = cfg.serve.api_key or os.environ.get("K4FLASH_API_KEY")
        defaults = {"time_length": cfg.time_length, "width": cfg.width, "height": cfg.height}
        alive = (lambda: health.alive()) if health is not None else (lambda: True)
        app = make_app(scheduler, model_info, api_key, cfg.serve.max_body_bytes, defaults, alive, metrics)
        http = _serve_http(app, cfg.serve.host, cfg.serve.port)
        threading.Thread(target=scheduler.run, args=(cfg.serve.drain_timeout_s,), name="k4flash-scheduler",
                         daemon=True).start()
        log.info("serving %s on http://%s:%d (%d model group(s) of %d rank(s); %d video(s) on record)%s",
                 cfg.model.name, cfg.serve.host, cfg.serve.port, runtime.dp_size, runtime.group_size,
                 len(records.records), "; API key required" if api_key else "")
    try:
        work(pipe, runtime, channel, output_dir, cfg.serve.save_latents, metadata, health)
    finally:
        if http is not None:
            scheduler.done.wait(timeout=5)
            http[0].should_exit = True
            http[1].join(timeout=5)
            log.info("server stopped")


def model_info(cfg, runtime, dtype) -> dict:
    """What GET /v1/models says of the model: its mesh, dtype and serve settings, a secret shown as set or not."""
    return {"id": cfg.model.name, "object": "model", "created": int(time.time()), "owned_by": "k4flash",
            "mesh": {"dp": runtime.dp_size, "ulysses": runtime.ulysses_size, "tp": runtime.tp_size,
                     "sequence_parallel": runtime.sequence_parallel, "world_size": runtime.world_size},
            "dtype": str(dtype).replace("torch.", ""), "config": shown_config(cfg)["serve"]}


def serve_from_config(cfg) -> int:
    """mode=serve: check, load once, serve until SIGTERM / Ctrl-C; returns 0."""
    # 1. Everything typed, checked before any weights load or process group forms.
    check_serve(cfg)
    request = request_plan(cfg)
    from k4flash.devices import resolve_device, resolve_dtype
    from parallel.plan import env_world

    device = resolve_device(cfg.device, env_world()[2])
    dtype = resolve_dtype(cfg.dtype, device)
    typical = SimpleNamespace(time_length=cfg.time_length, width=cfg.width, height=cfg.height)
    plan, offload, dit_offload = choose(cfg, request, typical, device)
    if cfg.text_encoder.offload == "auto":  # a server encodes all day: T5 stays, on the CPU where memory is short
        offload = "none" if offload == "none" else "cpu"
    weights_dir = check_weights(cfg)

    def body(runtime, health):
        from parallel.store import RunStore

        from .generate import build_pipeline

        pipe = build_pipeline(cfg, runtime, dtype, weights_dir, offload, dit_offload)
        channel = Channel(RunStore.launcher("serve") if runtime.distributed else RunStore.local("serve"))
        serve(cfg, runtime, pipe, health, channel, model_info(cfg, runtime, dtype))
        return 0
    return on_the_mesh(cfg, plan, body, grace_s=cfg.serve.drain_timeout_s + 10)
