"""mode=serve's dispatch on rank 0: the queue, which model group makes which video, its progress, and the records.

Work reaches a group through the launcher's store (parallel/store.py): the scheduler writes job n
of group g under one key, and every rank of the group waits for that key outside any collective
(an idle server sits in no collective, so no NCCL timeout runs out). The group's first rank reports
each stage and step, and the result, the same way, and reads whether the video was cancelled
(`Channel`). The scheduler's thread turns those reports into each video's view (stage, step,
progress, queue position, ETA: launch/progress.py) and keeps every change of it as an event for
GET /v1/videos/{id}/events.
"""
import json
import threading
import time
from collections import OrderedDict, deque

from k4flash.published import NUM_STEPS
from parallel.store import RunStore

from .progress import StageTimes, geometry_of, queued_eta, running
from .videos import STOPPED_REASON, VideoRecords

POLL_S = 0.05  # how often an idle rank looks for work in the store, and the scheduler for reports
ENDED = ("completed", "failed", "cancelled")
KEPT_EVENT_LOGS = 256  # ended videos whose events stay in memory (a later stream gets the final record)


class Channel:
    """Jobs, stage reports, cancels and results between rank 0 and each model group, through the run's store
    (namespace `serve`: job/<group>/<n>, stages/<id>, cancel/<id>, result/<id>)."""

    def __init__(self, store: RunStore):
        self.store = store

    def send_job(self, group: int, n: int, job: dict) -> None:
        self.store.set(f"job/{group}/{n}", json.dumps(job))

    def wait_job(self, group: int, n: int) -> dict:
        return json.loads(self.store.wait(f"job/{group}/{n}", POLL_S))

    def set_stages(self, video_id: str, report: dict) -> None:
        """report: {"stages": [[stage, step], ...] so far, "gpu_memory": {...} or absent}; all of it each time,
        so that a stage shorter than the scheduler's poll is still seen."""
        self.store.set(f"stages/{video_id}", json.dumps(report))

    def stages(self, video_id: str):
        value = self.store.get(f"stages/{video_id}")
        return None if value is None else json.loads(value)

    def request_cancel(self, video_id: str) -> None:
        self.store.set(f"cancel/{video_id}", "1")

    def cancel_requested(self, video_id: str) -> bool:
        return self.store.has(f"cancel/{video_id}")

    def send_result(self, video_id: str, result: dict) -> None:
        self.store.set(f"result/{video_id}", json.dumps(result))

    def result(self, video_id: str):
        value = self.store.get(f"result/{video_id}")
        return None if value is None else json.loads(value)


class Scheduler:
    """Rank 0: the queue, which group does what, each video's live view, and the records (its own thread runs
    `run`; the HTTP routes call the rest)."""

    def __init__(self, records: VideoRecords, channel: Channel, groups: int, queue_size: int,
                 stage_times: StageTimes, metrics=None):
        self.records, self.channel = records, channel
        self.queue, self.queue_size = deque(), queue_size
        self.busy = {}  # group → video id
        self.sent = [0] * groups  # jobs sent per group
        self.live = {}  # video id → {stage, step, since (monotonic s), percent, reported (stage reports seen)}
        self.events = OrderedDict()  # video id → [view, ...], one per change
        self.stage_times, self.metrics = stage_times, metrics
        self.lock = threading.Lock()
        self.draining = threading.Event()
        self.done = threading.Event()

    # --- what the HTTP routes call -------------------------------------------------------------------------------
    def submit(self, record: dict) -> bool:
        """Queue a new video; False when the queue is full."""
        with self.lock:
            if len(self.queue) >= self.queue_size:
                return False
            self.records.save(dict(record, stage="queued", step=0))
            self.queue.append(record["id"])
            self.live[record["id"]] = dict(stage="queued", step=0, since=time.monotonic(), percent=0, reported=0)
            self._publish(record["id"])
            return True

    def delete(self, video_id: str) -> bool:
        """Forget a video that is not being made; False while it is."""
        with self.lock:
            if video_id in self.busy.values():
                return False
            if video_id in self.queue:
                self.queue.remove(video_id)
                self._end_live(video_id)
            self.records.delete(video_id)
            self.events.pop(video_id, None)
            return True

    def cancel(self, video_id: str):
        """Stop a video: a queued one leaves the queue now, one in progress at its group's next step boundary.
        Returns its view, or None if it had already ended."""
        with self.lock:
            status = self.records.records[video_id]["status"]
            if status in ENDED:
                return None
            if video_id in self.queue:
                self.queue.remove(video_id)
                self._finish(video_id, dict(status="cancelled", completed_at=int(time.time())))
            else:
                self.channel.request_cancel(video_id)
            return self.view(video_id)

    def get(self, video_id: str):
        with self.lock:
            return self.view(video_id)

    def views(self) -> list:
        with self.lock:
            return [self.view(v) for v in self.records.records]

    def view(self, video_id: str):
        """(Under the lock.) The video's record with its live stage, step, progress, queue position and ETA; None if unknown."""
        record = self.records.records.get(video_id)
        if record is None:
            return None
        live = self.live.get(video_id)
        view = dict(record, steps=NUM_STEPS, queue_position=None, eta_s=None)
        view.setdefault("stage", None)
        view.setdefault("step", None)
        if record["status"] in ENDED:
            return dict(view, eta_s=0.0 if record["status"] == "completed" else None)
        if live is None:
            return view
        view.update(stage=live["stage"], step=live["step"], progress=live["percent"])
        if live["stage"] == "queued":
            position = list(self.queue).index(video_id) if video_id in self.queue else 0
            ahead = [self._total(v) for v in list(self.queue)[:position]]
            busy_left = [self._left(v) for v in self.busy.values()]
            view.update(queue_position=position + 1,
                        eta_s=queued_eta(self._total(video_id), ahead, busy_left, len(self.sent)))
        else:
            view["eta_s"] = self._left(video_id)
        return view

    def events_since(self, video_id: str, index: int) -> list:
        """The video's views from the index-th change on ([its current view] if none are kept)."""
        with self.lock:
            if video_id not in self.events:
                view = self.view(video_id)
                return [] if index or view is None else [view]
            return self.events[video_id][index:]

    # --- progress --------------------------------------------------------------------------------------------------
    def _estimate(self, video_id):
        return self.stage_times.estimate(geometry_of(self.records.records[video_id]["request"]))

    def _total(self, video_id):
        estimate, known = self._estimate(video_id)
        return sum(estimate.values()) if known else None

    def _left(self, video_id):
        live = self.live[video_id]
        estimate, known = self._estimate(video_id)
        return running(estimate, known, live["stage"], live["step"], NUM_STEPS, time.monotonic() - live["since"])[1]

    def _advance(self, video_id: str) -> None:
        """Take the group's new stage reports for a video in progress; move its progress on (never back)."""
        live = self.live[video_id]
        report = self.channel.stages(video_id)
        if report is not None:
            if self.metrics is not None and "gpu_memory" in report:
                self.metrics.gpu_memory(report["group"], report["gpu_memory"])
            for stage, step in report["stages"][live["reported"]:]:
                live.update(stage=stage, step=step, since=time.monotonic())
                live["reported"] += 1
                self._refresh(video_id)  # one event per stage and step, however fast they came
        self._refresh(video_id)

    def _refresh(self, video_id: str) -> None:
        live = self.live[video_id]
        if live["stage"] != "queued":
            estimate, known = self._estimate(video_id)
            percent, _ = running(estimate, known, live["stage"], live["step"], NUM_STEPS,
                                 time.monotonic() - live["since"])
            live["percent"] = max(live["percent"], percent)
        self._publish(video_id)

    def _publish(self, video_id: str) -> None:
        """Keep the view as an event if it changed (the ETA counts as changed when it moved by a second)."""
        view = self.view(video_id)
        log = self.events.setdefault(video_id, [])
        key = lambda v: (v["status"], v["stage"], v["step"], v["progress"], v["queue_position"],  # noqa: E731
                         None if v["eta_s"] is None else round(v["eta_s"]))
        if not log or key(log[-1]) != key(view):
            log.append(view)
        self.events.move_to_end(video_id)
        ended = [v for v, views in self.events.items() if views[-1]["status"] in ENDED]
        for old in ended[:max(0, len(ended) - KEPT_EVENT_LOGS)]:
            del self.events[old]

    def _end_live(self, video_id: str) -> None:
        self.live.pop(video_id, None)

    def _finish(self, video_id: str, fields: dict) -> None:
        live = self.live.get(video_id, {})
        if fields["status"] == "completed":
            fields = dict(fields, progress=100, step=NUM_STEPS, stage="writing")
        else:
            fields = dict(fields, stage=fields.get("stage", live.get("stage")),
                          step=fields.get("step", live.get("step")), progress=live.get("percent", 0))
        timings = fields.pop("stage_seconds", None)
        record = self.records.update(video_id, **fields)
        if timings is not None:
            self.stage_times.record(geometry_of(record["request"]), timings)
        if self.metrics is not None:
            self.metrics.ended(record, timings)
        self._end_live(video_id)
        self._publish(video_id)

    # --- the scheduler's thread ------------------------------------------------------------------------------------
    def _collect(self) -> None:
        for group, video_id in list(self.busy.items()):
            result = self.channel.result(video_id)
            if result is not None:
                self._advance(video_id)  # the last stages, if they came since the last poll
                self._finish(video_id, result)
                del self.busy[group]
            else:
                self._advance(video_id)

    def _assign(self) -> None:
        for group in range(len(self.sent)):
            if group in self.busy or not self.queue:
                continue
            video_id = self.queue.popleft()
            record = self.records.update(video_id, status="in_progress")
            self.channel.send_job(group, self.sent[group], {"id": video_id, **record["request"]})
            self.sent[group] += 1
            self.busy[group] = video_id
            self.live[video_id].update(stage="encoding", step=0, since=time.monotonic())  # the group starts there
            self._publish(video_id)
        for video_id in self.queue:  # positions and ETAs move as the queue does
            self._publish(video_id)

    def run(self, drain_timeout_s: float) -> None:
        """Assign and collect until drained: then finish what runs (within the bound), fail the queue, stop."""
        deadline = None
        while True:
            with self.lock:
                self._collect()
                if self.draining.is_set():
                    deadline = deadline or time.monotonic() + drain_timeout_s
                    for video_id in self.queue:
                        self._finish(video_id, dict(status="failed", error={"code": "server_stopped",
                                                                            "message": STOPPED_REASON}))
                    self.queue.clear()
                    if not self.busy or time.monotonic() > deadline:
                        for group in range(len(self.sent)):
                            self.channel.send_job(group, self.sent[group], {"stop": True})
                        break
                else:
                    self._assign()
            time.sleep(POLL_S)
        self.done.set()
