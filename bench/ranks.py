"""One rank in a fresh process: the baseline the benchmarks set against N ranks of parallel.spawn.run_ranks,
started the same way, so that its memory and timings compare."""
import multiprocessing as mp


def in_fresh_process(fn, *args):
    """fn(*args) in a freshly spawned process (no process group); returns what it returns."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
