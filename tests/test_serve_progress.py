"""The server's progress, ETA, events, cancel, metrics and key check, in one process: the real scheduler and app
(launch/scheduler.py, launch/api.py) with a stand-in for the model group that reports through the real
Channel on a local store. The same under torchrun with the tiny model: tests/test_serve.py."""
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from launch import api
from launch.metrics import Metrics
from launch.progress import STAGES, StageTimes, queued_eta, running
from launch.scheduler import Channel, Scheduler
from launch.videos import VideoRecords
from parallel.store import RunStore

KEY = "sekret-key-for-tests"
PREDICTED = {"encoding": 1.0, "denoising": 4.0, "decoding": 4.0, "writing": 1.0}  # proportions only
DEFAULTS = {"time_length": 0, "width": 512, "height": 512}
STEPS = [("encoding", 0)] + [("denoising", k) for k in range(5)] + [("decoding", 4), ("writing", 4)]


class Served:
    """The app and scheduler of a one-group server whose 'group' is this test: it takes jobs and reports."""

    def __init__(self, tmp_path, groups=1, absolute=False):
        self.channel = Channel(RunStore.local("serve"))
        self.times = StageTimes(lambda geometry: dict(PREDICTED), absolute=absolute)
        self.scheduler = None
        self.metrics = Metrics(lambda: len(self.scheduler.queue), lambda: len(self.scheduler.busy))
        self.scheduler = Scheduler(VideoRecords(tmp_path / "served"), self.channel, groups, 4, self.times,
                                   self.metrics)
        app = api.make_app(self.scheduler, {"id": "tiny"}, KEY, 65536, DEFAULTS, lambda: True, self.metrics)
        self.client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
        self.thread = threading.Thread(target=self.scheduler.run, args=(0.2,), daemon=True)  # drain bound
        self.thread.start()

    def submit(self, seed, **body):
        response = self.client.post("/v1/videos", json=dict(prompt="a red square", seconds="0", seed=seed, **body))
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def job(self, n, group=0):
        return json.loads(self.channel.store.wait(f"job/{group}/{n}", 0.01, timeout_s=10))

    def report(self, video_id, stages):
        self.channel.set_stages(video_id, {"stages": [list(s) for s in stages], "group": 0,
                                           "gpu_memory": {"in_use": 1000, "peak": 2000}})

    def finish(self, video_id, seconds=None):
        seconds = seconds or {s: 0.5 for s in STAGES}
        self.channel.send_result(video_id, dict(status="completed", completed_at=int(time.time()), file="x",
                                                rank=0, stage_seconds=seconds))

    def wait(self, video_id, status, step=None):
        deadline = time.monotonic() + 10
        while (view := self.client.get(f"/v1/videos/{video_id}").json())["status"] != status or \
                step is not None and view["step"] != step:
            assert time.monotonic() < deadline, view
            time.sleep(0.01)
        return view

    def events(self, video_id):
        with self.client.stream("GET", f"/v1/videos/{video_id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]

    def stop(self):
        self.scheduler.draining.set()
        self.thread.join(timeout=10)


@pytest.fixture
def served(tmp_path):
    server = Served(tmp_path)
    yield server
    server.stop()


def test_progress_is_monotone_by_stage_cost_and_the_eta_counts_down():
    estimate = dict(PREDICTED)
    points = [(stage, step, elapsed) for stage, step in STEPS for elapsed in (0.0, 0.3, 0.9, 50.0)]
    views = [running(estimate, True, stage, step, 4, elapsed) for stage, step, elapsed in points]
    percents, etas = [v[0] for v in views], [v[1] for v in views]
    assert percents == sorted(percents) and percents[0] == 0 and max(percents) == 99  # 100 only when completed
    assert etas == sorted(etas, reverse=True) and etas[0] == 10.0 and etas[-1] == 0.1  # a late stage: 5 % of it
    # Each denoising step is a quarter of the denoise's cost: step 2 of 4 is 1 s + 2 s of the 10 s.
    assert running(estimate, True, "denoising", 2, 4, 0.0) == (30, 7.0)
    assert running(estimate, False, "denoising", 2, 4, 0.0) == (30, None)  # proportions only: no ETA
    assert queued_eta(10.0, [10.0, 10.0], [3.0, 5.0], groups=2) == 3.0 + 10.0 + 10.0
    assert queued_eta(10.0, [], [3.0], groups=2) == 10.0  # a group is free
    assert queued_eta(None, [], [], groups=1) is None


def test_stage_times_are_measured_then_scaled_from_another_geometry():
    times = StageTimes(lambda g: {s: g[0] / 100 for s in STAGES}, absolute=False)
    assert times.estimate((512, 512, 0)) == ({s: 5.12 for s in STAGES}, False)
    times.record((512, 512, 0), {s: 1.0 for s in STAGES})
    times.record((512, 512, 0), {s: 3.0 for s in STAGES})
    times.record((512, 512, 0), {s: 2.0 for s in STAGES})
    assert times.estimate((512, 512, 0)) == ({s: 2.0 for s in STAGES}, True)  # the median of what was timed
    scaled, known = times.estimate((736, 352, 0))  # the cost model's ratio to the timed geometry
    assert known and scaled["denoising"] == pytest.approx(2.0 * 736 / 512)


def test_events_show_every_stage_and_step_even_when_reported_within_one_poll(served):
    video_id = served.submit(seed=1)
    assert served.job(0)["id"] == video_id
    served.report(video_id, STEPS)  # all at once, faster than the scheduler polls
    served.finish(video_id)
    events = served.events(video_id)
    seen = [(e["stage"], e["step"]) for e in events if e["status"] == "in_progress"]
    assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] == STEPS
    assert events[0]["status"] == "queued" and events[0]["queue_position"] == 1
    assert events[-1]["status"] == "completed" and events[-1]["progress"] == 100
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)
    assert served.events(video_id) == events  # a late subscriber gets the same history
    resumed = served.client.get(f"/v1/videos/{video_id}/events", headers={"Last-Event-ID": str(len(events) - 1)})
    assert resumed.text.count("data:") == 1 and f"id: {len(events)}\n" in resumed.text


def test_cancel_takes_a_queued_video_out_and_asks_a_running_one_to_stop(served):
    running_id, queued_id = served.submit(seed=1), served.submit(seed=2)
    served.job(0)
    ahead = served.client.get(f"/v1/videos/{queued_id}").json()
    assert ahead["status"] == "queued" and ahead["queue_position"] == 1
    cancelled = served.client.post(f"/v1/videos/{queued_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert served.client.post(f"/v1/videos/{queued_id}/cancel").status_code == 409  # already ended
    import openai  # its retrieve still reads the object, a status it does not list included

    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=served.client, max_retries=0)
    video = client.videos.retrieve(queued_id)
    assert (video.status, video.stage, video.queue_position) == ("cancelled", "queued", None)
    assert served.client.post("/v1/videos/video_nope/cancel").status_code == 404
    assert not served.channel.cancel_requested(running_id)
    response = served.client.post(f"/v1/videos/{running_id}/cancel")
    assert response.json()["status"] == "in_progress" and served.channel.cancel_requested(running_id)
    assert served.client.delete(f"/v1/videos/{running_id}").status_code == 409
    served.report(running_id, STEPS[:3])
    served.channel.send_result(running_id, dict(status="cancelled", completed_at=1, stage="denoising", step=1))
    view = served.wait(running_id, "cancelled")
    assert (view["stage"], view["step"], view["eta_s"]) == ("denoising", 1, None)
    assert served.client.post("/v1/videos", json=dict(prompt="next", seconds="0", seed=3)).status_code == 200
    assert served.job(1)["prompt"] == "next"  # the group takes the next video


def test_eta_comes_from_this_servers_timings(served):
    first = served.submit(seed=1)
    served.job(0)
    served.report(first, STEPS[:2])
    assert served.wait(first, "in_progress", step=0)["eta_s"] is None  # CPU, nothing timed yet: no made-up ETA
    served.finish(first, {"encoding": 1.0, "denoising": 8.0, "decoding": 2.0, "writing": 1.0})
    served.wait(first, "completed")
    second, third = served.submit(seed=2), served.submit(seed=3)
    served.job(1)
    served.report(second, STEPS[:4])  # denoising, 2 of 4 steps done
    view = served.wait(second, "in_progress", step=2)
    assert view["eta_s"] is not None and 4.0 - 0.5 <= view["eta_s"] <= 4.0 + 2.0 + 1.0
    queued = served.client.get(f"/v1/videos/{third}").json()
    assert queued["queue_position"] == 1 and queued["eta_s"] == pytest.approx(view["eta_s"] + 12.0, abs=0.5)


def test_metrics_parse_and_count_what_was_served(served):
    done, cancelled = served.submit(seed=1), served.submit(seed=2, size="736x352")
    served.job(0)
    served.client.post(f"/v1/videos/{cancelled}/cancel")
    served.report(done, STEPS)
    served.finish(done)
    served.wait(done, "completed")
    served.client.get("/v1/videos/video_nope")
    text = served.client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("k4flash_videos_total", (("status", "completed"),))] == 1
    assert samples[("k4flash_videos_total", (("status", "cancelled"),))] == 1
    assert samples[("k4flash_videos_total", (("status", "failed"),))] == 0
    assert samples[("k4flash_queue_depth", ())] == 0 and samples[("k4flash_videos_in_progress", ())] == 0
    for stage in STAGES:
        labels = (("seconds", "0"), ("size", "512x512"), ("stage", stage))
        assert samples[("k4flash_stage_seconds_count", labels)] == 1
        assert samples[("k4flash_stage_seconds_sum", labels)] == 0.5
    requests = lambda method, route, code: samples[("k4flash_http_requests_total", (  # noqa: E731
        ("code", code), ("method", method), ("route", route)))]
    assert requests("POST", "/v1/videos", "200") == 2
    assert requests("GET", "/v1/videos/{video_id}", "404") == 1  # by route template, not by id
    assert samples[("k4flash_gpu_memory_bytes", (("group", "0"), ("kind", "peak")))] == 2000


def test_the_key_is_compared_in_constant_time_and_never_shown(served, monkeypatch):
    calls = []
    real = api.hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    bare = TestClient(served.client.app)
    assert bare.get("/v1/videos").status_code == 401
    assert bare.get("/v1/videos", headers={"Authorization": "Bearer " + "x" * len(KEY)}).status_code == 401
    assert bare.get("/metrics").status_code == 401
    assert bare.get("/health").status_code == 200
    assert calls and all(b == f"Bearer {KEY}".encode() for _, b in calls)
    video_id = served.submit(seed=1)
    for path in ("/", "/v1/videos", f"/v1/videos/{video_id}", "/metrics"):
        assert KEY not in served.client.get(path).text


def test_a_network_address_without_a_key_is_refused_before_anything_loads(tmp_path, tiny_cache):
    """serve.host=0.0.0.0 with no key: exit 2, one line, nothing loaded; a loopback name, a key or
    serve.allow_unauthenticated=true each let it pass the check."""
    import subprocess
    import sys

    from bench.server import ENTRY, server_env
    from launch.checks import UsageError, check_exposure

    result = subprocess.run([sys.executable, str(ENTRY), "model=tiny", "mode=serve", "serve.host=0.0.0.0",
                             f"serve.output_dir={tmp_path / 'served'}"], cwd=tmp_path, env=server_env(tiny_cache),
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "serve.host=0.0.0.0 is reachable from other machines and no API key is set" in errors[0]
    assert "serve.allow_unauthenticated=true" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "served").exists() or not list((tmp_path / "served").iterdir())
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, False)
    check_exposure("0.0.0.0", "a-key", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(UsageError):
        check_exposure("0.0.0.0", None, False)
