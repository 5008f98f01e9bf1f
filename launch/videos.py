"""The server's video records and requests: the OpenAI videos shape, validated as the CLI validates, kept on disk.

No torch, no process group: `launch/serve.py` runs the model and the HTTP routes around these.
"""
import json
import logging
import time
import uuid
from pathlib import Path

from k4flash.geometry import validate_request, validate_seed
from k4flash.outputs import write_json_atomic

log = logging.getLogger("k4flash")

# What POST /v1/videos accepts. `model` and `input_reference` are what the openai client may send.
REQUEST_FIELDS = ("prompt", "seconds", "size", "time_length", "width", "height", "seed", "model")
STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
PRIVATE_FIELDS = ("request", "file", "rank")  # in the record on disk, not in the object a client sees
STOPPED_REASON = "the server stopped before this video finished; submit it again"


class RequestError(ValueError):
    """A request the CLI would refuse: HTTP 400 with this one-line message."""


def _as_int(name, value):
    if isinstance(value, bool):
        raise RequestError(f"{name}={value!r} must be a whole number")
    if isinstance(value, str):
        value = value.strip()
        if not value.lstrip("-").isdigit():
            raise RequestError(f"{name}={value!r} must be a whole number")
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise RequestError(f"{name}={value!r} must be a whole number")
    return value


def parse_request(body: dict, defaults: dict, model_name: str) -> dict:
    """{prompt, seed, time_length, width, height} from a request body; RequestError names the bad value.

    `seconds` (a string or a number) and `size` ("WxH") as OpenAI spells them, or time_length / width /
    height; defaults: the model's demo geometry and a random seed.
    """
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; allowed fields: {list(REQUEST_FIELDS)}")
    if "model" in body and body["model"] not in (model_name, "", None):
        raise RequestError(f"model={body['model']!r}: this server runs {model_name!r}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt={prompt!r} must be given as a string")
    if "seconds" in body and "time_length" in body:
        raise RequestError("give seconds or time_length, not both")
    if "size" in body and ("width" in body or "height" in body):
        raise RequestError("give size or width/height, not both")
    time_length = _as_int("seconds" if "seconds" in body else "time_length",
                          body.get("seconds", body.get("time_length", defaults["time_length"])))
    if "size" in body:
        size = str(body["size"]).lower().split("x")
        if len(size) != 2:
            raise RequestError(f"size={body['size']!r} must be WIDTHxHEIGHT, e.g. '672x384'")
        width, height = _as_int("size", size[0]), _as_int("size", size[1])
    else:
        width = _as_int("width", body.get("width", defaults["width"]))
        height = _as_int("height", body.get("height", defaults["height"]))
    seed = body.get("seed")
    seed = int.from_bytes(uuid.uuid4().bytes[:7], "big") if seed is None else _as_int("seed", seed)
    try:
        validate_request(prompt, time_length, height, width)
        validate_seed(seed)
    except ValueError as err:
        raise RequestError(str(err)) from None
    return dict(prompt=prompt, seed=seed, time_length=time_length, width=width, height=height)


def new_record(request: dict, model_name: str) -> dict:
    """A queued video object; its id is the server's own (no request can name a path)."""
    return dict(id=f"video_{uuid.uuid4().hex}", object="video", status="queued", created_at=int(time.time()),
                completed_at=None, model=model_name, prompt=request["prompt"], seconds=str(request["time_length"]),
                size=f"{request['width']}x{request['height']}", seed=request["seed"], progress=0, error=None,
                request=request)


def public(record: dict) -> dict:
    """The video object a client sees."""
    return {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}


class VideoRecords:
    """Every video's record, as `<output_dir>/<id>.record.json` (atomic writes) and in memory; the video is
    `<id>.mp4` (`.png` for an image) beside it, with the pipeline's sidecar `<id>.json`.

    Loading marks videos that were queued or in progress when the server stopped as failed, with a reason.
    """

    def __init__(self, output_dir):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = {}
        for path in sorted(self.dir.glob("video_*.record.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # not one of ours, or torn by a crash mid-write (writes are atomic, so: not ours)
            if record.get("status") in ("queued", "in_progress"):
                record.update(status="failed", error={"code": "server_stopped", "message": STOPPED_REASON})
                write_json_atomic(path, record, overwrite=True)
            self.records[record["id"]] = record

    def path(self, video_id: str, suffix: str = ".record.json") -> Path:
        return self.dir / f"{video_id}{suffix}"

    def save(self, record: dict) -> dict:
        self.records[record["id"]] = record
        try:
            write_json_atomic(self.path(record["id"]), record, overwrite=True)
        except OSError as err:  # a full disk: the record lives on in memory (its file only serves a restart)
            log.warning("video %s: its record was not saved: %s", record["id"], err)
        return record

    def update(self, video_id: str, **fields) -> dict:
        record = dict(self.records[video_id], **fields)
        return self.save(record)

    def delete(self, video_id: str) -> None:
        self.records.pop(video_id)
        for suffix in (".mp4", ".png", ".json", ".latents.safetensors", ".record.json"):
            self.path(video_id, suffix).unlink(missing_ok=True)
