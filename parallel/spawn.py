"""Run a function on N local ranks in fresh processes and collect what each returns: the tests' and the
benchmarks' multi-rank harness (gloo CPU ranks, or one NCCL rank per GPU).

Each rank gets one intra-op thread, like a rank per core, and the launcher's environment
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) on a free loopback port. Ranks are forked from a
server process that has imported torch, transformers' T5 and diffusers' VAE once (multiprocessing's
forkserver, preloaded): importing them is most of a tiny rank's start-up (about 9 s of CPU on a small
machine), and a forkserver's child is still a fresh process that shares no state with the caller.
"""
import os
import pickle
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp

# What every rank imports: the forkserver imports it once, and each rank is forked with it in place. The server
# never runs a torch op, so no thread pool or device is initialised before a fork.
PRELOAD = ["torch", "torch.distributed", "parallel.runtime", "parallel.tp", "k4flash.pipeline",
           "transformers.models.t5.modeling_t5", "diffusers.models.autoencoders.autoencoder_kl_cogvideox"]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue, device, degrees):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    from parallel.plan import Plan
    from parallel.runtime import init_runtime, shutdown_runtime
    try:
        runtime = init_runtime(device, timeout_s=120, plan=Plan.for_world(world, *degrees))
        # plain pickle copies tensors: torch's shared-memory handles die with the child
        queue.put((rank, pickle.dumps(fn(runtime, *args)), None))
    except BaseException:  # report, don't hang the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        shutdown_runtime()


def rank_context(start_method="forkserver"):
    """The multiprocessing context ranks start in: a preloaded forkserver (default), or "spawn" (each rank imports
    everything itself, as a launched rank does)."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server first starts, once per calling process
    return ctx


def run_ranks(world, fn, *args, timeout=300, device="cpu", tp=None, ulysses=1, sequence_parallel=False,
              start_method="forkserver"):
    """fn(runtime, *args) on `world` ranks; returns the per-rank results in rank order.

    tp: ranks per tensor-parallel group (default: all that ulysses leaves); ulysses, sequence_parallel: the rest
    of the plan (parallel.plan.Plan.for_world). device="cuda": rank r on cuda:r over NCCL (benchmarks on a GPU
    node); default gloo CPU ranks. start_method: see rank_context.
    """
    ctx = rank_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, device,
                                                 (tp, ulysses, sequence_parallel))) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, value, error = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} gave no result in {timeout} s")
                continue
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
