"""The collectives the tensor-parallel DiT and the row-parallel VAE decode use, counted
(docs/parallel.md "Collectives and their bytes").

Every collective of a TP forward or a parallel decode goes through here, so tests and benchmarks can read
how many ran and how many bytes each rank sent (`CommStats`), and the plan's
communication budget is a measured number, not a claim.
"""
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

# torch 2.13 renames the flat-tensor collectives (the old names warn); torch >= 2.5 has the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Progress:
    """How many collectives this process has entered on each process group, never reset.

    The heartbeat thread (parallel/health.py) publishes it: a live rank whose count on a group stays
    below its peers' for `parallel.timeout_s` never joined a collective they are waiting in. It counts
    calls, not completions, so it works alike for gloo (which blocks in the call) and NCCL (which
    queues the call and blocks at a later sync).
    """

    def __init__(self):
        self.entered = {}  # process group name → (its global ranks, collectives entered)

    def enter(self, group) -> None:
        group = group if group is not None else dist.group.WORLD
        name = dist.distributed_c10d._get_process_group_name(group)
        ranks, count = self.entered.get(name) or (dist.get_process_group_ranks(group), 0)
        self.entered[name] = (ranks, count + 1)


PROGRESS = Progress()


def _record(op, tensor, group):
    STATS.calls[op] = STATS.calls.get(op, 0) + 1
    STATS.bytes += tensor.numel() * tensor.element_size()
    PROGRESS.enter(group)


# torch.compiler.disable: under a compiled DiT the collectives (and their counting)
# stay eager graph breaks, so STATS stays exact and any backend (gloo, nccl) works.
@torch.compiler.disable
def all_reduce_sum(tensor, group) -> torch.Tensor:
    """In-place sum over the group (the row-parallel reduction)."""
    _record("all_reduce", tensor, group)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


@torch.compiler.disable
def all_gather_last_dim(tensor, group) -> torch.Tensor:
    """(..., n) on each of k ranks → (..., k·n), rank order along the last dim."""
    return torch.cat(all_gather_list(tensor, group), dim=-1)


def broadcast_from(tensor, src, group=None) -> torch.Tensor:
    _record("broadcast", tensor, group)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather_list(tensor, group) -> list:
    """The same-shaped tensor of every rank of the group, in rank order (the VAE's halo rows)."""
    _record("all_gather", tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def gather_to_first(tensor, group):
    """Every rank's same-shaped tensor, in rank order, on the group's first rank; None on the others."""
    _record("gather", tensor, group)
    first = dist.get_global_rank(group, 0)
    tensor = tensor.contiguous()
    if dist.get_rank() == first:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.gather(tensor, gather_list=parts, dst=first, group=group)
        return parts
    dist.gather(tensor, dst=first, group=group)
    return None


@torch.compiler.disable
def all_gather_tokens(tensor, group) -> torch.Tensor:
    """(B, s, D) on each of k ranks → (B, k·s, D), rank order along the tokens (sequence parallelism)."""
    _record("all_gather", tensor, group)
    k = dist.get_world_size(group)
    out = torch.empty((k * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out, tensor.contiguous(), group=group)  # (k·B, s, D), rank-major
    return out.unflatten(0, (k, -1)).transpose(0, 1).flatten(1, 2)  # (B, k·s, D)


@torch.compiler.disable
def reduce_scatter_tokens(tensor, group) -> torch.Tensor:
    """(B, k·s, D) partial sums on each of k ranks → this rank's (B, s, D) slice of their sum."""
    _record("reduce_scatter", tensor, group)
    k = dist.get_world_size(group)
    chunks = tensor.unflatten(1, (k, -1)).transpose(0, 1).contiguous()  # (k, B, s, D): rank j's slice at [j]
    out = torch.empty(chunks.shape[1:], dtype=tensor.dtype, device=tensor.device)
    _reduce_scatter_flat(out, chunks.flatten(0, 1), op=dist.ReduceOp.SUM, group=group)  # (k·B, s, D) in
    return out


@torch.compiler.disable
def all_to_all(tensor, group) -> torch.Tensor:
    """(k, ...) on each of k ranks: block j goes to rank j; returns (k, ...) whose block j came from rank j."""
    _record("all_to_all", tensor, group)
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor, group=group)
    return out
