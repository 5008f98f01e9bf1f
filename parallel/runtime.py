"""The distributed runtime: process group, device per local rank, the tensor-parallel mesh.

Launchers set the environment: torchrun and `python -m torch.distributed.launch` both
export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a plain `python` run has
none of them and is one rank with no process group at all.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import comm


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_mesh: object = None  # 1-D DeviceMesh over all ranks, None for one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        return comm.broadcast_from(tensor, src=0) if self.distributed else tensor

    def barrier(self):
        if self.distributed:
            dist.barrier()


def env_world() -> tuple:
    """(rank, world_size, local_rank) from the launcher's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local_rank


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto → cuda:LOCAL_RANK when CUDA is available, else cpu; a bare 'cuda' also means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_runtime(device: str = "auto", timeout_s: float = 600.0) -> Runtime:
    """Join the process group the launcher set up (nccl on GPU, gloo on CPU) and build the TP mesh."""
    rank, world, local_rank = env_world()
    device = resolve_device(device, local_rank)
    if world == 1:
        return Runtime(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    return Runtime(rank, world, local_rank, device, mesh)


def shutdown_runtime() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
