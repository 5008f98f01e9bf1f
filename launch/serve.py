"""`mode=serve`: the model stays loaded across the ranks and takes requests over an OpenAI-style videos API.

    torchrun --nproc-per-node 8 run_inference_distil.py mode=serve serve.port=8000

Rank 0 runs the HTTP server (FastAPI on uvicorn, in a thread of its own, so generation never blocks
it) and the scheduler's thread (launch/scheduler.py). Each model group (ulysses × tp ranks) takes
one video at a time; data-parallel groups work in parallel. Work, progress and results travel
through the launcher's store, outside any collective. Records and outputs live in
`serve.output_dir` (launch/videos.py), which every group's first rank must be able to write.

SIGTERM or Ctrl-C: new work gets 503, the videos in progress finish (within serve.drain_timeout_s)
and are written, queued ones are marked failed, and every rank exits 0.
"""
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from .checks import UsageError, check_serve, check_weights
from .config import shown_config
from .lifecycle import on_the_mesh
from .planning import choose, request_plan
from .scheduler import Channel, Scheduler
from .videos import RequestError, VideoRecords, new_record, parse_request, public

log = logging.getLogger("k4flash")


def make_app(scheduler: Scheduler, info: dict, api_key, max_body_bytes: int, defaults: dict, alive):
    """The FastAPI app: /v1/videos (create, list, retrieve, content, delete), /v1/models, /health."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse

    app = FastAPI(title="k4flash", docs_url=None, redoc_url=None, openapi_url=None)
    records = scheduler.records

    def error(status, message, code, headers=None):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                            status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and int(length) > max_body_bytes:
                return error(413, f"request body of {length} bytes is over serve.max_body_bytes={max_body_bytes}",
                             "request_too_large")
        return await call_next(request)

    def find(video_id):
        record = records.records.get(video_id)
        return None if record is None else scheduler.progress(record)

    @app.post("/v1/videos")
    async def create(request: Request):
        if scheduler.draining.is_set():
            return error(503, "the server is stopping; submit again later", "server_stopping")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            return error(413, f"request body of {len(raw)} bytes is over serve.max_body_bytes={max_body_bytes}",
                         "request_too_large")
        content_type = request.headers.get("content-type", "")
        try:
            if content_type.startswith("multipart/form-data") or content_type.startswith(
                    "application/x-www-form-urlencoded"):
                form = await request.form()
                body = {k: v for k, v in form.items() if isinstance(v, str)}
                if len(body) != len(form):
                    raise RequestError("file fields are not accepted (input_reference is not supported)")
            else:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
            record = new_record(parse_request(body, defaults, info["id"]), info["id"])
        except (RequestError, ValueError) as err:
            return error(400, str(err).splitlines()[0], "invalid_request")
        if not scheduler.submit(record):
            return error(429, f"the queue is full ({scheduler.queue_size} videos); retry later", "queue_full",
                         headers={"Retry-After": "5"})
        return public(record)

    @app.get("/v1/videos")
    async def list_videos():
        data = sorted((public(find(v)) for v in list(records.records)), key=lambda r: r["created_at"], reverse=True)
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        record = find(video_id)
        return error(404, f"no video {video_id!r}", "not_found") if record is None else public(record)

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str):
        record = find(video_id)
        if record is None:
            return error(404, f"no video {video_id!r}", "not_found")
        if record["status"] != "completed":
            return error(409, f"video {video_id} is {record['status']}, not completed", "not_ready")
        image = record["request"]["time_length"] == 0
        return FileResponse(records.path(video_id, ".png" if image else ".mp4"),
                            media_type="image/png" if image else "video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        if video_id not in records.records:
            return error(404, f"no video {video_id!r}", "not_found")
        if not scheduler.cancel(video_id):
            return error(409, f"video {video_id} is being generated; delete it once it is done", "in_progress")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [info]}

    @app.get("/health")
    async def health():
        ok = alive() and not scheduler.draining.is_set()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    return app


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


def work(pipe, runtime, channel: Channel, output_dir: Path, save_latents: bool, metadata: dict, health=None):
    """Every rank: take this group's jobs from the store until told to stop; the group's first rank writes."""
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

        def on_step(done, total):
            if main:
                channel.set_progress(video_id, int(90 * done / total))
        try:
            generation = pipe.generate(job["prompt"], job["time_length"], job["width"], job["height"], job["seed"],
                                       progress=False, on_step=on_step)
        except (FloatingPointError, ValueError) as err:  # the same on every rank of the group: it goes on
            runtime.barrier_group()
            if main:
                channel.send_result(video_id, dict(status="failed", progress=0, error={
                    "code": "generation_failed", "message": f"{type(err).__name__}: {err}".splitlines()[0]}))
            continue
        if main:
            try:
                written = pipe.write_outputs(generation, output_dir / f"{video_id}.mp4", save_latents=save_latents,
                                             overwrite=True, extra_metadata=metadata)
                channel.send_result(video_id, dict(status="completed", progress=100, completed_at=int(time.time()),
                                                   file=str(written), rank=runtime.rank))
            except (OSError, ValueError) as err:
                channel.send_result(video_id, dict(status="failed", error={"code": "write_failed",
                                                                           "message": str(err).splitlines()[0]}))


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
        records = VideoRecords(output_dir)
        scheduler = Scheduler(records, channel, runtime.dp_size, cfg.serve.queue_size)
        api_key = cfg.serve.api_key or os.environ.get("K4FLASH_API_KEY")
        defaults = {"time_length": cfg.time_length, "width": cfg.width, "height": cfg.height}
        alive = (lambda: health.alive()) if health is not None else (lambda: True)
        app = make_app(scheduler, model_info, api_key, cfg.serve.max_body_bytes, defaults, alive)
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
