"""The distributed runtime: process group, device per local rank, the (dp, ulysses, tp) mesh of a `Plan`
(docs/parallel.md "Mesh and roles").

Launchers set the environment: torchrun and `python -m torch.distributed.launch` both
export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a plain `python` run has
none of them and is one rank with no process group at all.
"""
import atexit
import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from k4flash.devices import resolve_device

from . import comm
from .layout import check_layout
from .plan import Plan, env_world

log = logging.getLogger("k4flash")


@dataclass
class Runtime:
    """Where this rank sits in the (dp, ulysses, tp) mesh of its `plan`: W = dp · ulysses · tp ranks, TP innermost.

    A model group is the ulysses · tp consecutive ranks that make one video together; dp groups
    work on different prompts.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    plan: Plan = Plan()
    group_mesh: object = None  # this rank's model group as a 1-D DeviceMesh; None when it is one rank
    dit_mesh: object = None  # what parallel.parallelize_dit takes: the TP group, or a ("ulysses", "tp") mesh
    dp_rank: int = 0  # which data-parallel group (share of the prompts) this rank works on
    owns_process_group: bool = False  # init_runtime created the process group (none was initialised before)

    @property
    def dp_size(self) -> int:
        return self.plan.dp

    @property
    def tp_size(self) -> int:
        return self.plan.tp

    @property
    def ulysses_size(self) -> int:
        return self.plan.ulysses

    @property
    def sequence_parallel(self) -> bool:
        return self.plan.sequence_parallel

    @property
    def group_size(self) -> int:
        return self.group_mesh.size() if self.group_mesh is not None else 1

    @property
    def group_rank(self) -> int:
        return self.group_mesh.get_local_rank() if self.group_mesh is not None else 0

    @property
    def is_main(self) -> bool:
        """The job's rank 0: logs and reports."""
        return self.rank == 0

    @property
    def is_group_main(self) -> bool:
        """Its model group's first rank: runs T5, gets the decoded frames, writes the group's outputs."""
        return self.group_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast_from_group_main(self, tensor: torch.Tensor) -> torch.Tensor:
        """The model group's first rank's tensor, on every rank of the group."""
        if self.group_size == 1:
            return tensor
        group = self.group_mesh.get_group()
        return comm.broadcast_from(tensor, src=dist.get_global_rank(group, 0), group=group)

    def close(self) -> None:
        """Destroy the process group if init_runtime created it; a group it found already made is the maker's
        to destroy. Idempotent."""
        if self.owns_process_group:
            self.owns_process_group = False
            shutdown_runtime()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def barrier_group(self):
        """Every rank of this model group meets here (a server resynchronises a group after a failed video)."""
        if self.group_size > 1:
            dist.barrier(group=self.group_mesh.get_group())

    def any_in_group(self, flag: bool) -> bool:
        """True on every rank of this model group if any rank passed True: one agreement, so that all stop at
        the same step (a server's cancel). On NCCL a one-element all-reduce and a sync with the host."""
        if self.group_size == 1:
            return bool(flag)
        vote = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group_mesh.get_group())
        return bool(vote.item())

    def peers(self) -> list:
        """The ranks whose health this rank watches (parallel/health.py): all of them from rank 0, else the
        ranks it shares collectives with (its model group) and rank 0."""
        if self.is_main:
            return list(range(self.world_size))
        if self.group_mesh is None:
            return [0]
        return sorted(set(dist.get_process_group_ranks(self.group_mesh.get_group())) | {0})


BACKSTOP_S = 30.0
# The NCCL environment a production job wants (docs/parallel.md "Fault model"):
NCCL_ENV = {
    # A collective that times out or fails: the watchdog aborts the communicators and ends the process
    # (the default, stated): the backstop if the heartbeat thread could not act first.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # ...and first dumps the flight recorder (the last collectives of every rank, to
    # TORCH_NCCL_DEBUG_INFO_TEMP_FILE, /tmp/nccl_trace_rank_<r> by default), which needs a trace buffer.
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    # No blocking wait: it would make every collective hold the host until the GPU finishes, serialising
    # the step. Failures are the heartbeat thread's to find, not a raising wait's.
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}

_EXIT_HOOK_REGISTERED = False


def _freeze_heap_at_exit() -> None:
    gc.freeze()  # every object still alive goes to the permanent generation, which no collection visits


def skip_exit_collections() -> None:
    """At interpreter exit, leave the heap to the operating system instead of garbage-collecting it.

    Python's finalization runs several full collections over every object still alive: with
    torch, transformers, diffusers and Hydra loaded that is about 0.5 million objects, and
    1-1.5 s of CPU between a rank's last output and its exit (in every rank at once, so more
    on a busy machine). An atexit hook freezes the heap first, so those collections find
    nothing to scan. The other atexit handlers (logging's flush, multiprocessing's queue
    feeders, weakref finalizers) still run and reference counting still frees objects; only
    the `__del__` of reference cycles still alive at exit is skipped, which Python does not
    promise at exit either. Outputs are closed before their "wrote" line, so none is at stake.
    Idempotent.
    """
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        _EXIT_HOOK_REGISTERED = True
        atexit.register(_freeze_heap_at_exit)


def init_runtime(device: str = "auto", timeout_s: float = 600.0, plan: Plan = None,
                 fast_exit: bool = True) -> Runtime:
    """Join the process group the launcher set up (nccl on GPU, gloo on CPU) and build the mesh of `plan`.

    plan=None: every rank in one tensor-parallel group. fast_exit: this process is a job's rank, which
    exits when the job is done: skip the interpreter's exit-time collections (`skip_exit_collections`).
    Pass False from inside a program that owns its own process lifetime (the library entry point does).
    """
    if fast_exit:
        skip_exit_collections()
    rank, world, local_rank = env_world()
    plan = plan or Plan.for_world(world)
    if plan.world_size != world:
        raise ValueError(f"the plan {plan} is for {plan.world_size} rank(s); this launch has {world}")
    device = resolve_device(device, local_rank)
    if world == 1:
        return Runtime(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        for name, value in NCCL_ENV.items():  # read when the group forms; a user's own setting wins
            os.environ.setdefault(name, value)
    created = not dist.is_initialized()
    if created:
        # The launchers' layout over the nodes (parallel/layout.py): refused here, before the group forms.
        check_layout(plan.group_size, timeout_s)
        # The heartbeat thread (parallel/health.py) names a rank that never joins after timeout_s; the
        # group's own timeout is the backstop behind it, so that NCCL's watchdog does not abort first.
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s + BACKSTOP_S),
                                device_id=device if device.type == "cuda" else None)
    base = dict(rank=rank, world_size=world, local_rank=local_rank, device=device, plan=plan,
                dp_rank=rank // plan.group_size, owns_process_group=created)
    if plan.group_size == 1:  # pure data parallelism: its groups never talk during generation, so no communicator
        return Runtime(**base)
    group_mesh, dit_mesh = model_group_meshes(device.type, world, plan.ulysses, plan.tp)
    return Runtime(**base, group_mesh=group_mesh, dit_mesh=dit_mesh)


def model_group_meshes(device_type, world, ulysses, tp):
    """(this rank's model group as a 1-D mesh, the DiT's mesh): only the groups the plan talks in.

    Communicators cost GPU memory and start-up time. One model group is the world's own group. The
    DiT mesh is the model group itself when it is all TP (or all Ulysses), else a ("ulysses", "tp")
    mesh of the model group's ranks, TP innermost so that it stays on NVLink. Every rank creates every
    group (new_group is collective over the world), in the same order.
    """
    from torch.distributed.device_mesh import DeviceMesh

    size = ulysses * tp
    if size == world:
        model_group = dist.group.WORLD
    else:
        model_group, _ = dist.new_subgroups(group_size=size)  # consecutive ranks
    group_mesh = DeviceMesh.from_group(model_group, device_type, mesh_dim_names=("group",))
    if ulysses == 1:
        return group_mesh, DeviceMesh.from_group(model_group, device_type, mesh_dim_names=("tp",))
    firsts = range(0, world, size)
    grid = [torch.arange(first, first + size).reshape(ulysses, tp) for first in firsts]  # (ulysses, tp) per group
    ulysses_group = model_group if tp == 1 else \
        dist.new_subgroups_by_enumeration([g[:, k].tolist() for g in grid for k in range(tp)])[0]
    tp_group = dist.new_subgroups_by_enumeration([g[u].tolist() for g in grid for u in range(ulysses)])[0]
    mine = grid[dist.get_rank() // size]
    dit_mesh = DeviceMesh.from_group([ulysses_group, tp_group], device_type, mesh=mine,
                                     mesh_dim_names=("ulysses", "tp"))
    return group_mesh, dit_mesh


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
