"""GET /metrics: the server's Prometheus metrics (prometheus-client, a registry of its own per server).

    k4flash_queue_depth, k4flash_videos_in_progress      gauges, read at each scrape
    k4flash_videos_total{status}                          videos that ended here: completed, failed, cancelled
    k4flash_stage_seconds{stage,size,seconds}             histogram of each completed video's stages, by geometry
    k4flash_http_requests_total{method,route,code}        requests by route template (not the raw path: ids
                                                          would make a series per video) and status code
    k4flash_gpu_memory_bytes{group,kind}                  with CUDA: in_use and peak on each model group's first
                                                          rank, as it last reported
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .progress import STAGES

# From a tiny model's image on a CPU (~0.01 s) to a long video's decode on a slow GPU (minutes).
STAGE_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, queue_depth, in_progress):
        """queue_depth(), in_progress(): read at each scrape."""
        disable_created_metrics()  # the *_created series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        Gauge("k4flash_queue_depth", "Videos waiting for a model group", registry=self.registry).set_function(
            queue_depth)
        Gauge("k4flash_videos_in_progress", "Videos being made", registry=self.registry).set_function(in_progress)
        self.videos = Counter("k4flash_videos", "Videos that ended on this server, by final status", ["status"],
                              registry=self.registry)
        self.stage_seconds = Histogram("k4flash_stage_seconds", "Seconds per stage of each completed video",
                                       ["stage", "size", "seconds"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.requests = Counter("k4flash_http_requests", "HTTP requests by route and status code",
                                ["method", "route", "code"], registry=self.registry)
        self.gpu_bytes = Gauge("k4flash_gpu_memory_bytes", "GPU memory on a model group's first rank (CUDA only)",
                               ["group", "kind"], registry=self.registry)
        for status in ("completed", "failed", "cancelled"):  # present at 0 from the start, as dashboards expect
            self.videos.labels(status)

    def ended(self, record: dict, stage_seconds) -> None:
        self.videos.labels(record["status"]).inc()
        if record["status"] == "completed" and stage_seconds is not None:
            for stage in STAGES:
                self.stage_seconds.labels(stage, record["size"], record["seconds"]).observe(stage_seconds[stage])

    def request(self, method: str, route: str, code: int) -> None:
        self.requests.labels(method, route, str(code)).inc()

    def gpu_memory(self, group: int, memory: dict) -> None:
        for kind, value in memory.items():
            self.gpu_bytes.labels(str(group), kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
