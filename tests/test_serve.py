"""mode=serve: a real server on loopback under torchrun (tp = 2, and dp = 2) with the tiny model, driven by the
official openai client and raw HTTP; its videos are the CLI's; every refusal has its status; SIGTERM drains;
a restart keeps the record; a dead rank makes /health 503 and the job exit 3."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from parity import assert_parity
from bench.server import ENTRY, KEY, Server, server_env

pytestmark = pytest.mark.slow  # launchers and servers: `-m "not slow"` leaves them out

IMAGE = dict(prompt="a red square", seconds="0", size="512x512")


@pytest.fixture(scope="module")
def cli_latents_seed_3(tmp_path_factory, tiny_cache):
    """The CLI's latents for IMAGE with seed 3: what a served video with that seed must give."""
    return _cli_latents(tmp_path_factory.mktemp("cli"), tiny_cache, seed=3)


def _cli_latents(tmp_path, tiny_cache, seed, time_length=0, width=512, height=512):
    out = tmp_path / f"cli-{seed}-{time_length}.png"
    result = subprocess.run([sys.executable, str(ENTRY), "model=tiny", "prompt=a red square", f"seed={seed}",
                             f"time_length={time_length}", f"width={width}", f"height={height}", f"save_path={out}",
                             "save_latents=true", "progress=false"], cwd=tmp_path, env=server_env(tiny_cache),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(str(out.with_name(out.stem + ".latents.safetensors")))["latents"]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, tiny_cache):
    cwd = tmp_path_factory.mktemp("serve_tp2")
    server = Server(cwd, tiny_cache, 2, f"serve.api_key={KEY}", "serve.queue_size=2", "serve.max_body_bytes=2048")
    yield server
    server.stop()


def test_openai_client_videos_are_the_clis(tp2, cli_latents_seed_3):
    client = tp2.client()
    video = client.videos.create(**IMAGE, extra_body={"seed": 3})
    assert (video.object, video.status, video.seconds, video.size, video.seed) == ("video", "queued", "0", "512x512", 3)
    done = client.videos.retrieve(video.id)
    while done.status not in ("completed", "failed"):
        time.sleep(0.1)
        done = client.videos.retrieve(video.id)
    assert done.status == "completed" and done.progress == 100, done
    content = client.videos.download_content(video.id)
    assert content.response.headers["content-type"] == "image/png" and content.content[:4] == b"\x89PNG"
    served = load_file(str(tp2.output_dir / f"{video.id}.latents.safetensors"))["latents"]
    assert_parity(served, cli_latents_seed_3, atol=1e-5, rtol=1e-5, what="latents")
    assert video.id in [v.id for v in client.videos.list().data]


def test_concurrent_requests_through_the_client_and_raw_http_all_complete(tp2):
    client, ids, errors = tp2.client(), [], []

    def through_client(seed):
        try:
            ids.append(client.videos.create(**IMAGE, extra_body={"seed": seed}).id)
        except Exception as err:  # a 429 is fine here: the queue holds 2
            errors.append(err)

    threads = [threading.Thread(target=through_client, args=(s,)) for s in (10, 11)]
    for t in threads:
        t.start()
    status, body, _ = tp2.request("POST", "/v1/videos", {"prompt": "a blue circle", "time_length": 0, "width": 672,
                                                        "height": 384, "seed": 12})
    for t in threads:
        t.join()
    if status == 200:
        ids.append(json.loads(body)["id"])
    assert len(ids) >= 2 and all(getattr(e, "status_code", None) == 429 for e in errors)
    for video_id in ids:
        assert tp2.wait(video_id)["status"] == "completed"


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "seconds": "0", "size": "500x672"}, 400, "height x width = 672x500 is not allowed"),
    ({"prompt": "x", "time_length": -2}, 400, "time_length=-2 is out of range"),
    ({"prompt": " "}, 400, "prompt=' ' is empty"),
    ({"prompt": "x", "fps": 8}, 400, "unknown field 'fps'"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed='abc' must be a whole number"),
    ({"prompt": "x" * 3000}, 413, "over serve.max_body_bytes=2048"),
])
def test_bad_requests_get_the_clis_message(tp2, body, status, message):
    got, response, _ = tp2.request("POST", "/v1/videos", body)
    assert got == status and message in json.loads(response)["error"]["message"], response


def test_keys_ids_and_unfinished_videos(tp2):
    assert tp2.status("/v1/videos", key=None)[0] == 401
    assert tp2.status("/v1/videos", key="wrong")[0] == 401
    assert tp2.status("/health", key=None)[0] == 200  # health needs no key
    assert tp2.status("/v1/videos/video_nope")[0] == 404
    assert tp2.status("/v1/videos/video_nope/content")[0] == 404
    assert tp2.status("/v1/videos/..%2F..%2Fetc%2Fpasswd")[0] == 404  # ids are the server's: no path in them
    status, body, _ = tp2.request("POST", "/v1/videos", {"prompt": "a slow one", "seconds": 1, "size": "512x512"})
    video_id = json.loads(body)["id"]
    assert tp2.status(f"/v1/videos/{video_id}/content")[0] == 409
    record = tp2.wait(video_id)
    assert record["status"] == "completed" and tp2.status(f"/v1/videos/{video_id}/content")[0] == 200
    # A video in progress cannot be deleted (409); sent as a multipart form, as a browser's form would.
    boundary = "k4flash-test-boundary"
    form = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in (("prompt", "a form"), ("seconds", "1"), ("size", "512x512"))) + f"--{boundary}--\r\n"
    status, body, _ = tp2.request("POST", "/v1/videos", raw=form.encode(),
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and json.loads(body)["prompt"] == "a form", body
    formed = json.loads(body)["id"]
    tp2.wait(formed, statuses=("in_progress",))
    assert tp2.request("DELETE", f"/v1/videos/{formed}")[0] == 409
    assert tp2.wait(formed)["status"] == "completed"
    status, body, headers = tp2.request("GET", f"/v1/videos/{formed}/content")
    assert status == 200 and headers.get("content-type") == "video/mp4" and body[4:8] == b"ftyp"
    models_body = tp2.status("/v1/models")[1]
    models = json.loads(models_body)["data"][0]
    assert models["id"] == "tiny" and models["mesh"]["tp"] == 2 and models["dtype"] == "float32"
    assert models["config"]["api_key"] == "<hidden>" and KEY.encode() not in models_body  # set, and never echoed
    assert tp2.request("DELETE", f"/v1/videos/{video_id}")[0] == 200
    assert tp2.status(f"/v1/videos/{video_id}")[0] == 404 and not list(tp2.output_dir.glob(f"{video_id}*"))


def test_a_full_queue_answers_429_with_retry_after(tp2):
    """serve.queue_size=2 exactly: with the one model group busy, the first 2 waiting videos are taken, every one
    after them gets 429 with Retry-After (a bound off by one either way fails)."""
    busy = json.loads(tp2.request("POST", "/v1/videos", {"prompt": "busy", "seconds": 2, "size": "512x512"})[1])["id"]
    tp2.wait(busy, statuses=("in_progress",))
    answers = [tp2.request("POST", "/v1/videos", {"prompt": f"p{i}", "seconds": 0, "size": "512x512"})
               for i in range(5)]
    still_busy = json.loads(tp2.status(f"/v1/videos/{busy}")[1])["status"] == "in_progress"
    assert still_busy, "the busy video finished while the queue was filled: the bound was not under test"
    assert [a[0] for a in answers] == [200, 200, 429, 429, 429]
    assert all(a[2].get("Retry-After") for a in answers[2:])
    for video_id in [busy] + [json.loads(a[1])["id"] for a in answers[:2]]:
        assert tp2.wait(video_id)["status"] == "completed"


def test_dp2_serves_two_videos_at_once_with_the_clis_latents(tmp_path, tiny_cache, cli_latents_seed_3):
    server = Server(tmp_path, tiny_cache, 2, "parallel.tp=1")
    try:
        ids = [json.loads(server.request("POST", "/v1/videos", dict(IMAGE, seed=s), key=None)[1])["id"]
               for s in (3, 4)]
        records = [server.wait(i) for i in ids]
        assert all(r["status"] == "completed" for r in records)
        served = load_file(str(server.output_dir / f"{ids[0]}.latents.safetensors"))["latents"]
        assert_parity(served, cli_latents_seed_3, atol=1e-5, rtol=1e-5, what="latents")
        written_by = {json.loads(server.records_path(i).read_text())["rank"] for i in ids}
        assert written_by == {0, 1}  # one video per data-parallel group, at the same time
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_drains_and_a_restart_keeps_the_record(tmp_path, tiny_cache):
    server = Server(tmp_path, tiny_cache, 2, "serve.queue_size=4")
    running = json.loads(server.request("POST", "/v1/videos", {"prompt": "p", "seconds": 1, "size": "512x512"},
                                        key=None)[1])["id"]
    queued = [json.loads(server.request("POST", "/v1/videos", {"prompt": f"q{i}", "seconds": 1, "size": "512x512"},
                                        key=None)[1])["id"] for i in range(2)]
    server.wait(running, statuses=("in_progress",))
    assert server.stop() == 0, server.output()  # SIGTERM: the video in progress finishes, every rank exits 0
    records = {p.name.split(".")[0]: json.loads(p.read_text()) for p in server.output_dir.glob("*.record.json")}
    assert records[running]["status"] == "completed" and (server.output_dir / f"{running}.mp4").stat().st_size > 0
    assert all(records[q]["status"] == "failed" and "stopped" in records[q]["error"]["message"] for q in queued)

    again = Server(tmp_path, tiny_cache, 1)  # one process, same output_dir
    try:
        listed = {v["id"]: v["status"] for v in json.loads(again.status("/v1/videos", key=None)[1])["data"]}
        assert listed[running] == "completed" and all(listed[q] == "failed" for q in queued)
        assert again.status(f"/v1/videos/{running}/content", key=None)[0] == 200
    finally:
        assert again.stop() == 0


def test_a_dead_rank_makes_health_503_and_the_job_exit_3(tmp_path, tiny_cache):
    """A frozen rank (SIGSTOP: the launcher sees nothing, as when a node hangs): rank 0's heartbeats miss it,
    /health turns 503, then the verdict ends the job with status 3, naming it."""
    server = Server(tmp_path, tiny_cache, 2, launcher="launch.torchrun")
    frozen = server.ranks()[1]
    os.kill(frozen, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    saw_503 = False
    while "error:" not in server.output() and time.monotonic() < deadline:
        saw_503 |= server.status("/health", key=None)[0] == 503
        time.sleep(0.05)
    os.kill(frozen, signal.SIGKILL)  # the launcher's SIGTERM cannot reach a stopped process (it would wait 30 s)
    assert server.process.wait(timeout=60) == 3, server.output()
    assert "error: distributed run failed: rank 1 died or froze" in server.output()
    assert saw_503  # between the missed heartbeats and the verdict, /health said so


def test_a_busy_port_is_refused_before_anything_loads(tmp_path, tiny_cache):
    """serve.port taken by another process: exit 2 with one error line naming it, before any weights load (it
    used to load the whole model, then die with a traceback)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clock = time.monotonic()
        result = subprocess.run([sys.executable, str(ENTRY), "model=tiny", "mode=serve", f"serve.port={port}",
                                 f"serve.output_dir={tmp_path / 'served'}"], cwd=tmp_path, env=server_env(tiny_cache),
                                capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert f"serve.port={port} on serve.host=127.0.0.1: cannot listen there" in errors[0]
    assert "Traceback" not in result.stderr and "loaded" not in result.stdout + result.stderr
    assert time.monotonic() - clock < 60


def test_the_environment_key_is_required_and_never_shown_on_another_host(tmp_path, tiny_cache):
    """$K4FLASH_API_KEY (no serve.api_key): every route but /health needs it, and no response or log line shows
    it. serve.host=127.0.0.2 (another loopback address): the server listens there, and only there."""
    import urllib.error
    import urllib.request

    secret = "env-secret-key"
    server = Server(tmp_path, tiny_cache, 1, env={"K4FLASH_API_KEY": secret}, host="127.0.0.2")
    try:
        with pytest.raises(urllib.error.URLError):  # not on 127.0.0.1
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5)
        assert server.status("/v1/videos", key=None)[0] == 401 and server.status("/v1/videos", key="wrong")[0] == 401
        assert server.status("/health", key=None)[0] == 200
        status, body = server.status("/v1/models", key=secret)
        assert status == 200 and secret.encode() not in body
        status, body, _ = server.request("POST", "/v1/videos", dict(IMAGE, seed=5), key=secret)
        record = server.wait(json.loads(body)["id"], key=secret)
        assert record["status"] == "completed" and secret.encode() not in json.dumps(record).encode()
    finally:
        assert server.stop() == 0
    assert secret not in Path(server.log.name).read_text()  # the whole log (the server has closed it)
    assert not [p for p in server.output_dir.iterdir() if secret.encode() in p.read_bytes()]


def _events(server, video_id, on_event=None):
    """The video's Server-Sent Events until it ends; on_event(view) sees each as it comes."""
    import urllib.request

    request = urllib.request.Request(f"http://{server.host}:{server.port}/v1/videos/{video_id}/events",
                                     headers={"Authorization": f"Bearer {KEY}"})
    views = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if line.startswith(b"data:"):
                views.append(json.loads(line[5:]))
                if on_event is not None:
                    on_event(views[-1])
    return views


def test_events_cancel_and_metrics_under_torchrun_sh_tp2(tmp_path, tiny_cache, cli_latents_seed_3):
    """launch/torchrun.sh, 2 ranks, tp 2: a video's events show every stage and the 4 steps in order with a
    monotone progress; one cancelled mid-denoise stops on both ranks at the same step boundary (else the job
    would hang in a collective) with no file; a queued one leaves the queue; the next video has the CLI's
    latents; /metrics counts exactly these videos."""
    from prometheus_client.parser import text_string_to_metric_families

    server = Server(tmp_path, tiny_cache, 2, "parallel.tp=2", f"serve.api_key={KEY}", launcher="torchrun.sh")
    try:
        video = dict(prompt="a red square", seconds="1", size="512x512")
        first = json.loads(server.request("POST", "/v1/videos", dict(video, seed=7))[1])["id"]
        views = _events(server, first)
        steps = [(v["stage"], v["step"]) for v in views]
        assert [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]] == [
            ("queued", 0), ("encoding", 0), *[("denoising", k) for k in range(5)], ("decoding", 4), ("writing", 4)]
        assert [v["progress"] for v in views] == sorted(v["progress"] for v in views) and views[-1]["progress"] == 100
        assert views[-1]["status"] == "completed" and views[-1]["eta_s"] == 0

        second = json.loads(server.request("POST", "/v1/videos", dict(video, seed=8))[1])["id"]
        queued = json.loads(server.request("POST", "/v1/videos", dict(video, seed=9))[1])["id"]
        etas, asked = [], []

        def cancel_at_the_first_step(view):
            etas.append(view["eta_s"])
            if view["stage"] == "denoising" and view["step"] == 1 and not asked:
                asked.append(True)
                status, body, _ = server.request("POST", f"/v1/videos/{queued}/cancel")
                assert status == 200 and json.loads(body)["status"] == "cancelled"  # out of the queue at once
                assert server.request("POST", f"/v1/videos/{second}/cancel")[0] == 200
        views = _events(server, second, cancel_at_the_first_step)
        assert views[-1]["status"] == "cancelled" and views[-1]["stage"] == "denoising" and views[-1]["step"] < 4
        assert [e for e in etas if e is not None]  # the first video's timings give an ETA
        assert server.wait(queued, statuses=("cancelled",))["stage"] == "queued"
        assert not [p for p in server.output_dir.iterdir() if p.name.startswith((second, queued))
                    and not p.name.endswith(".record.json")]

        third = json.loads(server.request("POST", "/v1/videos", dict(IMAGE, seed=3))[1])["id"]
        assert _events(server, third)[-1]["status"] == "completed"
        served = load_file(str(server.output_dir / f"{third}.latents.safetensors"))["latents"]
        assert_parity(served, cli_latents_seed_3, atol=1e-5, rtol=1e-5, what="latents after a cancel")

        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
                   text_string_to_metric_families(server.status("/metrics")[1].decode()) for s in family.samples}
        assert {status: samples[("k4flash_videos_total", (("status", status),))]
                for status in ("completed", "cancelled", "failed")} == {"completed": 2, "cancelled": 2, "failed": 0}
        assert samples[("k4flash_stage_seconds_count", (("seconds", "1"), ("size", "512x512"), ("stage", "decoding")))] == 1
        assert samples[("k4flash_http_requests_total", (("code", "200"), ("method", "POST"), ("route", "/v1/videos")))] == 4
    finally:
        assert server.stop() == 0, server.output()
