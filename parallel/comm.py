"""The collectives the tensor-parallel DiT and the row-parallel VAE decode use, counted
(docs/parallel.md "Collectives and their bytes").

Every collective of a TP forward or a parallel decode goes through here, so tests and benchmarks can read
how many ran and how many bytes each rank sent (`CommStats`), and the plan's
communication budget is a measured number, not a claim. What runs them is a backend object
(`TorchCollectives`); `use_backend` gives the same calls to a counter or a stand-in instead.
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    calls: dict = field(default_factory=dict)  # op name → count
    bytes: int = 0  # payload bytes this rank contributed

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def reset(self):
        self.calls.clear()
        self.bytes = 0


STATS = CommStats()


class TorchCollectives:
    """The collectives as torch.distributed runs them (NCCL on GPUs, gloo on CPUs): comm's default backend."""

    # torch 2.13 renames the flat-tensor collectives (the old names warn); torch >= 2.5 has the old ones.
    _all_gather_flat = staticmethod(getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)
    _reduce_scatter_flat = staticmethod(getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)

    def size(self, group) -> int:
        return dist.get_world_size(group)

    def rank(self) -> int:
        return dist.get_rank()

    def global_rank(self, group, index: int) -> int:
        return dist.get_global_rank(group, index)

    def __init__(self):
        self._ranks = {}  # process group name → its global ranks

    def group_key(self, group):
        """(name, global ranks) of a process group, as the heartbeat thread publishes its progress on it."""
        group = group if group is not None else dist.group.WORLD
        name = dist.distributed_c10d._get_process_group_name(group)
        if name not in self._ranks:
            self._ranks[name] = dist.get_process_group_ranks(group)
        return name, self._ranks[name]

    def all_reduce(self, tensor, group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

    def all_gather(self, parts, tensor, group):
        dist.all_gather(parts, tensor, group=group)

    def all_gather_into(self, out, tensor, group):
        self._all_gather_flat(out, tensor, group=group)

    def reduce_scatter_into(self, out, tensor, group):
        self._reduce_scatter_flat(out, tensor, op=dist.ReduceOp.SUM, group=group)

    def all_to_all(self, out, tensor, group):
        dist.all_to_all_single(out, tensor, group=group)

    def broadcast(self, tensor, src, group):
        dist.broadcast(tensor, src=src, group=group)

    def gather(self, tensor, parts, dst, group):
        dist.gather(tensor, gather_list=parts, dst=dst, group=group)


_backend = TorchCollectives()


def backend():
    """The collectives backend in use (TorchCollectives unless `use_backend` put another in place)."""
    return _backend


@contextlib.contextmanager
def use_backend(collectives):
    """Run the collectives below through `collectives` (same methods as TorchCollectives): a counter's wrapper,
    or a shape-only stand-in that needs no process group (parallel/rank_work.py)."""
    global _backend
    saved, _backend = _backend, collectives
    try:
        yield collectives
    finally:
        _backend = saved


class Progress:
    """How many collectives this process has entered on each process group, never reset.

    The heartbeat thread (parallel/health.py) publishes it: a live rank whose count on a group stays
    below its peers' for `parallel.timeout_s` never joined a collective they are waiting in. It counts
    calls, not completions, so it works alike for gloo (which blocks in the call) and NCCL (which
    queues the call and blocks at a later sync).
    """

    def __init__(self):
        self.entered = {}  # process group name → (its global ranks, collectives entered)

    def enter(self, name: str, ranks: list) -> None:
        _, count = self.entered.get(name) or (ranks, 0)
        self.entered[name] = (ranks, count + 1)


PROGRESS = Progress()


def _record(op, tensor, group):
    STATS.calls[op] = STATS.calls.get(op, 0) + 1
    STATS.bytes += tensor.numel() * tensor.element_size()
    key = _backend.group_key(group)
    if key is not None:  # None: a stand-in group, which no heartbeat watches
        PROGRESS.enter(*key)


# torch.compiler.disable: under a compiled DiT the collectives (and their counting)
# stay eager graph breaks, so STATS stays exact and any backend (gloo, nccl) works.
@torch.compiler.disable
def all_reduce_sum(tensor, group) -> torch.Tensor:
    """In-place sum over the group (the row-parallel reduction)."""
    _record("all_reduce", tensor, group)
    _backend.all_reduce(tensor, group)
    return tensor


@torch.compiler.disable
def all_gather_last_dim(tensor, group) -> torch.Tensor:
    """(..., n) on each of k ranks → (..., k·n), rank order along the last dim."""
    return torch.cat(all_gather_list(tensor, group), dim=-1)


def broadcast_from(tensor, src, group=None) -> torch.Tensor:
    _record("broadcast", tensor, group)
    _backend.broadcast(tensor, src, group)
    return tensor


def all_gather_list(tensor, group) -> list:
    """The same-shaped tensor of every rank of the group, in rank order (the VAE's halo rows)."""
    _record("all_gather", tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(_backend.size(group))]
    _backend.all_gather(parts, tensor.contiguous(), group)
    return parts


def gather_to_first(tensor, group):
    """Every rank's same-shaped tensor, in rank order, on the group's first rank; None on the others."""
    _record("gather", tensor, group)
    first = _backend.global_rank(group, 0)
    tensor = tensor.contiguous()
    if _backend.rank() == first:
        parts = [torch.empty_like(tensor) for _ in range(_backend.size(group))]
        _backend.gather(tensor, parts, first, group)
        return parts
    _backend.gather(tensor, None, first, group)
    return None


@torch.compiler.disable
def all_gather_tokens(tensor, group) -> torch.Tensor:
    """(B, s, D) on each of k ranks → (B, k·s, D), rank order along the tokens (sequence parallelism)."""
    _record("all_gather", tensor, group)
    k = _backend.size(group)
    out = torch.empty((k * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _backend.all_gather_into(out, tensor.contiguous(), group)  # (k·B, s, D), rank-major
    return out.unflatten(0, (k, -1)).transpose(0, 1).flatten(1, 2)  # (B, k·s, D)


@torch.compiler.disable
def reduce_scatter_tokens(tensor, group) -> torch.Tensor:
    """(B, k·s, D) partial sums on each of k ranks → this rank's (B, s, D) slice of their sum."""
    _record("reduce_scatter", tensor, group)
    k = _backend.size(group)
    chunks = tensor.unflatten(1, (k, -1)).transpose(0, 1).contiguous()  # (k, B, s, D): rank j's slice at [j]
    out = torch.empty(chunks.shape[1:], dtype=tensor.dtype, device=tensor.device)
    _backend.reduce_scatter_into(out, chunks.flatten(0, 1), group)  # (k·B, s, D) in
    return out


@torch.compiler.disable
def all_to_all(tensor, group) -> torch.Tensor:
    """(k, ...) on each of k ranks: block j goes to rank j; returns (k, ...) whose block j came from rank j."""
    _record("all_to_all", tensor, group)
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    _backend.all_to_all(out, tensor, group)
    return out
