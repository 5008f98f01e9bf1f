"""mode=serve's HTTP side on rank 0: the FastAPI app, its routes and its guard (no torch).

    POST /v1/videos, GET /v1/videos, GET|DELETE /v1/videos/{id}, GET /v1/videos/{id}/content   OpenAI's videos API
    GET /v1/videos/{id}/events     Server-Sent Events: the video's view at each change, until it ends
    POST /v1/videos/{id}/cancel    a queued video leaves the queue; one in progress stops at its next step
    GET /v1/models, GET /health, GET /metrics (launch/metrics.py), GET / (the page, launch/web.py)
"""
import asyncio
import hmac
import json

from .scheduler import ENDED, Scheduler
from .videos import RequestError, new_record, parse_request, public
from .web import add_page

OPEN_PATHS = ("/", "/health")  # no key: the page holds no secret (its calls send the key), health is for probes
EVENT_POLL_S = 0.05


def make_app(scheduler: Scheduler, info: dict, api_key, max_body_bytes: int, defaults: dict, alive, metrics):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Match

    app = FastAPI(title="k4flash", docs_url=None, redoc_url=None, openapi_url=None)
    records = scheduler.records
    expected = f"Bearer {api_key}".encode() if api_key else None

    def error(status, message, code, headers=None):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                            status_code=status, headers=headers)

    def route_of(request) -> str:
        for route in app.router.routes:
            if route.matches(request.scope)[0] == Match.FULL:
                return route.path
        return "unmatched"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        response = await _guarded(request, call_next)
        metrics.request(request.method, route_of(request), response.status_code)
        return response

    async def _guarded(request, call_next):
        if expected and request.url.path not in OPEN_PATHS:
            # Constant time: how much of a wrong key matched must not show in how long the answer takes.
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
                return error(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and int(length) > max_body_bytes:
                return error(413, f"request body of {length} bytes is over serve.max_body_bytes={max_body_bytes}",
                             "request_too_large")
        return await call_next(request)

    def not_found(video_id):
        return error(404, f"no video {video_id!r}", "not_found")

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
        return public(scheduler.get(record["id"]))

    @app.get("/v1/videos")
    async def list_videos():
        data = sorted((public(v) for v in scheduler.views()), key=lambda r: r["created_at"], reverse=True)
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        view = scheduler.get(video_id)
        return not_found(video_id) if view is None else public(view)

    @app.get("/v1/videos/{video_id}/events")
    async def events(video_id: str, request: Request):
        """From the first change kept (or after Last-Event-ID, as a reconnecting EventSource sends it)."""
        if scheduler.get(video_id) is None:
            return not_found(video_id)
        last = request.headers.get("last-event-id", "0")

        async def stream():
            sent = int(last) if last.isdigit() else 0
            while True:
                for view in scheduler.events_since(video_id, sent):
                    sent += 1
                    yield f"id: {sent}\ndata: {json.dumps(public(view))}\n\n"
                    if view["status"] in ENDED:
                        return
                await asyncio.sleep(EVENT_POLL_S)
                if scheduler.get(video_id) is None:  # deleted meanwhile
                    return
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/videos/{video_id}/cancel")
    async def cancel(video_id: str):
        view = scheduler.get(video_id)
        if view is None:
            return not_found(video_id)
        view = scheduler.cancel(video_id)
        if view is None:
            return error(409, f"video {video_id} has already ended", "already_ended")
        return public(view)

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str):
        view = scheduler.get(video_id)
        if view is None:
            return not_found(video_id)
        if view["status"] != "completed":
            return error(409, f"video {video_id} is {view['status']}, not completed", "not_ready")
        image = view["request"]["time_length"] == 0
        return FileResponse(records.path(video_id, ".png" if image else ".mp4"),
                            media_type="image/png" if image else "video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        if scheduler.get(video_id) is None:
            return not_found(video_id)
        if not scheduler.delete(video_id):
            return error(409, f"video {video_id} is being generated; cancel it (POST /v1/videos/{video_id}/cancel) "
                         "or delete it once it is done", "in_progress")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [info]}

    @app.get("/health")
    async def health():
        ok = alive() and not scheduler.draining.is_set()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        from .metrics import CONTENT_TYPE
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    add_page(app, needs_key=bool(api_key), defaults=defaults)
    return app
