"""A served video's progress and ETA: where it is (stage, step), how far in stage-cost terms, how long to go.

The cost of each stage comes from this server's own timings of earlier videos of the same geometry
(the median of the last few). Before it has any, it comes from the cost model (parallel/cost.py),
scaled by how this server compared with the model on a geometry it has timed. With neither (a CPU
server's first video: the cost model knows GPUs only), the cost model's proportions still weigh
the progress, and no ETA is given rather than a made-up one. No torch, no HTTP.
"""
import statistics
import threading
from collections import defaultdict, deque

STAGES = ("encoding", "denoising", "decoding", "writing")
HISTORY = 8  # timings kept per stage and geometry: recent enough to follow a warming-up server
IN_STAGE_CAP = 0.95  # a stage running past its estimate holds its progress below its end, so it stays monotone


def geometry_of(request: dict) -> tuple:
    """(width, height, time_length): what a stage's cost depends on."""
    return request["width"], request["height"], request["time_length"]


def stage_seconds(timings: dict, write_s: float) -> dict:
    """A generation's timings (k4flash Generation.timings) as seconds per stage; a parked DiT's copies count
    with the stage they sit in."""
    return {"encoding": timings.get("text_encode_s", 0.0),
            "denoising": timings.get("dit_restore_s", 0.0) + timings.get("denoise_s", 0.0),
            "decoding": timings.get("dit_offload_s", 0.0) + timings.get("dit_free_s", 0.0)
            + timings.get("decode_s", 0.0),
            "writing": write_s}


class StageTimes:
    """Seconds per stage by geometry: measured here, else predicted (see the module's docstring)."""

    def __init__(self, predict, absolute: bool):
        """predict(geometry) → {stage: seconds}; absolute: those are seconds on this server's device (a GPU
        the cost model knows), not only proportions."""
        self.predict, self.absolute = predict, absolute
        self.measured = defaultdict(lambda: {stage: deque(maxlen=HISTORY) for stage in STAGES})
        self.last_measured = None
        self.predicted = {}
        self.lock = threading.Lock()

    def record(self, geometry: tuple, seconds: dict) -> None:
        with self.lock:
            for stage in STAGES:
                self.measured[geometry][stage].append(float(seconds[stage]))
            self.last_measured = geometry

    def _prediction(self, geometry):
        if geometry not in self.predicted:
            self.predicted[geometry] = self.predict(geometry)
        return self.predicted[geometry]

    def estimate(self, geometry: tuple):
        """({stage: seconds}, known): known is False when the seconds are only the cost model's proportions."""
        with self.lock:
            if geometry in self.measured:
                return {s: statistics.median(v) for s, v in self.measured[geometry].items()}, True
            predicted = self._prediction(geometry)
            if self.last_measured is None:
                return predicted, self.absolute
            reference = self._prediction(self.last_measured)
            timed = self.measured[self.last_measured]
            return {s: predicted[s] * statistics.median(timed[s]) / max(reference[s], 1e-9) for s in STAGES}, True


def _position(estimate: dict, stage: str, step: int, steps: int, elapsed_s: float):
    """(seconds of work done, seconds left) at `stage`, `step` denoising steps done, elapsed_s into the current
    stage (denoising: into the current step)."""
    index = STAGES.index(stage)
    before = sum(estimate[s] for s in STAGES[:index])
    after = sum(estimate[s] for s in STAGES[index + 1:])
    if stage == "denoising":
        per_step = estimate["denoising"] / steps
        into = min(elapsed_s, IN_STAGE_CAP * per_step) if step < steps else 0.0
        done_here, length = step * per_step + into, estimate["denoising"]
    else:
        length = estimate[stage]
        done_here = min(elapsed_s, IN_STAGE_CAP * length)
    return before + done_here, max(length - done_here, 0.0) + after


def running(estimate: dict, known: bool, stage: str, step: int, steps: int, elapsed_s: float):
    """(progress 0..99, eta_s or None) of a video in progress."""
    done, left = _position(estimate, stage, step, steps, elapsed_s)
    total = done + left
    percent = min(99, int(100 * done / total)) if total > 0 else 0
    return percent, (round(left, 1) if known else None)


def queued_eta(own_total: float, ahead_totals: list, busy_left: list, groups: int):
    """A queued video's ETA: the soonest a group frees up, the videos ahead of it shared over the groups, then
    its own; None when any of them is unknown."""
    if own_total is None or None in ahead_totals or None in busy_left:
        return None
    soonest = 0.0 if len(busy_left) < groups else min(busy_left)
    return round(soonest + sum(ahead_totals) / groups + own_total, 1)


def cost_model_predictor(dit_params: dict, tp: int, ulysses: int, sequence_parallel: bool, gpu=None):
    """predict(geometry) from parallel/cost.py: T5, the DiT's steps and the VAE on `gpu` (default: an H100 at
    50 % MFU, for proportions), and an MP4 write at an assumed 5 ms per frame (CPU libx264)."""
    from k4flash.geometry import latent_shape
    from k4flash.published import NUM_STEPS
    from parallel.cost import H100_SXM, predict, scaled_vae_counts

    def stages(geometry):
        width, height, time_length = geometry
        latent_fhw = latent_shape(time_length, height, width)[:3]
        p = predict(dit_params, gpu=gpu or H100_SXM, tp=tp, ulysses=ulysses, sequence_parallel=sequence_parallel,
                    mfu=0.5, steps=NUM_STEPS, latent_fhw=latent_fhw, vae=scaled_vae_counts(latent_fhw))
        frames = 4 * (latent_fhw[0] - 1) + 1
        return {"encoding": p["t5_s"], "denoising": p["denoise_s"], "decoding": p["vae_s"], "writing": 0.005 * frames}
    return stages
