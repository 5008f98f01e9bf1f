"""mode=serve's dispatch on rank 0: the queue, which model group makes which video, and the records.

Work reaches a group through the launcher's store (parallel/store.py): the scheduler writes job n
of group g under one key, and every rank of the group waits for that key outside any collective
(an idle server sits in no collective, so no NCCL timeout runs out); the group's first rank
reports progress and the result the same way (`Channel`).
"""
import json
import threading
import time
from collections import deque

from parallel.store import RunStore

from .videos import STOPPED_REASON, VideoRecords

POLL_S = 0.05  # how often an idle rank looks for work in the store, and the scheduler for results


class Channel:
    """Jobs, progress and results between rank 0 and each model group, through the run's store (namespace
    `serve`: job/<group>/<n>, progress/<video id>, result/<video id>)."""

    def __init__(self, store: RunStore):
        self.store = store

    def send_job(self, group: int, n: int, job: dict) -> None:
        self.store.set(f"job/{group}/{n}", json.dumps(job))

    def wait_job(self, group: int, n: int) -> dict:
        return json.loads(self.store.wait(f"job/{group}/{n}", POLL_S))

    def set_progress(self, video_id: str, percent: int) -> None:
        self.store.set(f"progress/{video_id}", str(percent))

    def progress(self, video_id: str):
        value = self.store.get(f"progress/{video_id}")
        return None if value is None else int(value)

    def send_result(self, video_id: str, result: dict) -> None:
        self.store.set(f"result/{video_id}", json.dumps(result))

    def result(self, video_id: str):
        value = self.store.get(f"result/{video_id}")
        return None if value is None else json.loads(value)


class Scheduler:
    """Rank 0: the queue, which group does what, and the records (its own thread runs `run`)."""

    def __init__(self, records: VideoRecords, channel: Channel, groups: int, queue_size: int):
        self.records, self.channel = records, channel
        self.queue, self.queue_size = deque(), queue_size
        self.busy = {}  # group → video id
        self.sent = [0] * groups  # jobs sent per group
        self.lock = threading.Lock()
        self.draining = threading.Event()
        self.done = threading.Event()

    def submit(self, record: dict) -> bool:
        """Queue a new video; False when the queue is full."""
        with self.lock:
            if len(self.queue) >= self.queue_size:
                return False
            self.records.save(record)
            self.queue.append(record["id"])
            return True

    def cancel(self, video_id: str) -> bool:
        with self.lock:
            if video_id in self.busy.values():
                return False
            if video_id in self.queue:
                self.queue.remove(video_id)
            self.records.delete(video_id)
            return True

    def progress(self, record: dict) -> dict:
        if record["status"] == "in_progress":
            percent = self.channel.progress(record["id"])
            if percent is not None:
                return dict(record, progress=percent)
        return record

    def _collect(self) -> None:
        for group, video_id in list(self.busy.items()):
            result = self.channel.result(video_id)
            if result is not None:
                self.records.update(video_id, **result)
                del self.busy[group]

    def _assign(self) -> None:
        for group in range(len(self.sent)):
            if group in self.busy or not self.queue:
                continue
            video_id = self.queue.popleft()
            record = self.records.update(video_id, status="in_progress")
            self.channel.send_job(group, self.sent[group], {"id": video_id, **record["request"]})
            self.sent[group] += 1
            self.busy[group] = video_id

    def run(self, drain_timeout_s: float) -> None:
        """Assign and collect until drained: then finish what runs (within the bound), fail the queue, stop."""
        deadline = None
        while True:
            with self.lock:
                self._collect()
                if self.draining.is_set():
                    deadline = deadline or time.monotonic() + drain_timeout_s
                    for video_id in self.queue:
                        self.records.update(video_id, status="failed",
                                            error={"code": "server_stopped", "message": STOPPED_REASON})
                    self.queue.clear()
                    if not self.busy or time.monotonic() > deadline:
                        for group in range(len(self.sent)):
                            self.channel.send_job(group, self.sent[group], {"stop": True})
                        break
                else:
                    self._assign()
            time.sleep(POLL_S)
        self.done.set()
