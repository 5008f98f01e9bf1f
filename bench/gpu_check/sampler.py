"""Section 6: host syncs of the sampler driving the DiT as the pipeline does, counted twice: in a torch.profiler
trace with CUDA activity, and by torch.cuda's sync debug mode."""
import contextlib
import re
import time

import torch
from torch.autograd import DeviceType

from bench.configs import autocast_for, dit_inputs
from bench.timing import synchronize

# Host-blocking CUDA calls as the profiler names them (runtime API, driver API; an optional _vNNNN suffix).
SYNC_CALL = re.compile(r"^cu(da)?(StreamSynchronize|DeviceSynchronize|CtxSynchronize|EventSynchronize|"
                       r"Memcpy|MemcpyDtoH)(_v\d+)?$")
MARK_SAMPLER, MARK_DIT, MARK_STEP_END = "gpu_check.sampler", "gpu_check.dit_call", "gpu_check.step_end"


def profile_sampler(model, config, device, dtype):
    """Section 6: sample() driving the DiT as Kandinsky4T2VPipeline.denoise does, once under the profiler, once
    timed under torch.cuda's sync debug mode (a second counter of the same syncs, independent of the profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from k4flash.sampler import load_schedule, sample

    params = config["params"]
    shape = (*config["latent"], params["in_visual_dim"])
    _, text, _ = dit_inputs(config, device, dtype)
    schedule = load_schedule()
    autocast = autocast_for(device, dtype)
    # Where the loop starts and ends: profiler ranges, and how many sync warnings were caught by then.
    live, positions = {"warnings": []}, {"dit": [], "step_end": []}

    def velocity(latent, timestep):  # k4flash/pipeline.py Kandinsky4T2VPipeline.denoise's closure
        positions["dit"].append(_sync_warnings(live["warnings"]))
        with record_function(MARK_DIT):
            t = torch.full((1,), float(timestep), device=device)
            with autocast():
                return model(latent[None].to(dtype), text, t)[0]

    def on_step(i, timestep, latent):
        positions["step_end"].append(_sync_warnings(live["warnings"]))
        with record_function(MARK_STEP_END):
            pass

    def run():
        with torch.no_grad():
            return sample(velocity, shape, schedule, seed=0, device=device, on_step=on_step)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(MARK_SAMPLER):
            latents = run()
        synchronize(device)  # outside the marked range: neither this sync nor the profiler's is counted
    counts = count_syncs(prof.events())

    positions["dit"].clear()
    positions["step_end"].clear()
    clock = time.perf_counter()  # not Timer: its own synchronize would be caught as one of the sampler's syncs
    with sync_debug_warnings(device) as warned:
        live["warnings"] = warned
        run()
    synchronize(device)
    sampler_s = time.perf_counter() - clock
    first, last = positions["dit"][0], positions["step_end"][-1]
    return dict(steps=len(schedule.timesteps), **counts, warned_before_loop=first, warned_in_loop=last - first,
                warned_after_loop=_sync_warnings(warned) - last, latents_finite=bool(torch.isfinite(latents).all()),
                sampler_s=sampler_s, profiler="CPU + CUDA" if device.type == "cuda" else "CPU only")


@contextlib.contextmanager
def sync_debug_warnings(device):
    """torch.cuda.set_sync_debug_mode("warn"): a warning at every synchronizing CUDA call; yields the list
    they are recorded in (always empty on the CPU, where nothing synchronizes)."""
    import warnings

    if device.type != "cuda":
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not the first per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _sync_warnings(caught) -> int:
    return sum("synchroniz" in str(w.message) for w in caught)  # "called a synchronizing CUDA operation"


def count_syncs(events) -> dict:
    """Host-blocking CUDA calls in the sampler's range, split at the first DiT call and the last on_step."""
    def ranges(name):  # the host-side ranges: with CUDA activity each marker also has a GPU-side annotation
        return [e.time_range for e in events if e.name == name and e.device_type == DeviceType.CPU]

    start = min(r.start for r in ranges(MARK_SAMPLER))
    end = max(r.end for r in ranges(MARK_SAMPLER))
    loop_start = min(r.start for r in ranges(MARK_DIT))
    loop_end = max(r.start for r in ranges(MARK_STEP_END))
    syncs = [e.time_range.start for e in events if SYNC_CALL.match(e.name) and start <= e.time_range.start <= end]
    dtoh = [e for e in events if "Memcpy DtoH" in e.name and start <= e.time_range.start <= end]
    return dict(syncs_before_loop=sum(s < loop_start for s in syncs),
                syncs_in_loop=sum(loop_start <= s <= loop_end for s in syncs),
                syncs_after_loop=sum(s > loop_end for s in syncs), syncs_total=len(syncs), dtoh_copies=len(dtoh),
                sampler_profiled_s=(end - start) / 1e6)
