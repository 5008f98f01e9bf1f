"""Sharded DiT loading: each rank materialises only its shard (docs/parallel.md "Sharded loading").

build on meta → check the file's keys and shapes against the full model → apply the
TP plan on meta → read each parameter's slice (safetensors `get_slice`, or a
memory-mapped .pt) → move → eval. `python -m parallel.convert` turns the published .pt
into the .safetensors file this prefers.
"""
import logging

import torch
from safetensors import safe_open

from k4flash.dit import DiffusionTransformer3D
from k4flash.weights import check_state_dict, preferred_checkpoint, read_checkpoint

from .tp import mesh_coords, parallelize_dit, shard_plan_for, slice_reader, take_shard, validate_tp_degree

log = logging.getLogger("k4flash")


class _SafetensorsSource:
    """Reads blocks of tensors; the file is reopened per tensor so no mapping outlives its read."""

    def __init__(self, path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def reader(self, key):
        def read(rows, cols):
            with safe_open(self.path, framework="pt") as f:
                piece = f.get_slice(key)
                if rows is None and cols is None:
                    return piece[:]
                if cols is None:
                    return piece[rows[0]:rows[1]]
                return piece[:, cols[0]:cols[1]] if rows is None else piece[rows[0]:rows[1], cols[0]:cols[1]]
        return read


class _TorchSource:
    """A memory-mapped .pt: slicing touches only the pages it reads."""

    def __init__(self, path):
        self.state = read_checkpoint(path)
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}

    def reader(self, key):
        return slice_reader(self.state[key])


def open_checkpoint(checkpoint_path):
    path = preferred_checkpoint(checkpoint_path)
    if path.suffix == ".safetensors":
        return _SafetensorsSource(path), path
    log.info("reading %s through mmap; `python -m parallel.convert %s` makes a safetensors copy that loads "
             "with less memory per rank", checkpoint_path, checkpoint_path)
    return _TorchSource(path), path


def load_dit_sharded(params: dict, checkpoint_path, mesh, device="cpu", dtype=torch.float32):
    """A DiT holding this rank's shard, loaded from the published checkpoint."""
    _, rank, world = mesh_coords(mesh)
    validate_tp_degree(params, world)  # before touching the file
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    source, path = open_checkpoint(checkpoint_path)
    check_state_dict({k: torch.empty(s, device="meta") for k, s in source.shapes.items()}, model.state_dict(),
                     source=f"DiT checkpoint {path}")
    parallelize_dit(model, mesh)
    sharded = shard_plan_for(model)
    state = {}
    for name, param in model.named_parameters():
        read = source.reader(name)
        if name in sharded:
            style, full_shape = sharded[name]
            piece = take_shard(read, style, name.rsplit(".", 1)[1], full_shape, rank, world)
        else:
            piece = read(None, None)
        state[name] = piece.to(device=device, dtype=dtype).contiguous()  # a copy: no view into the file
    model.load_state_dict(state, strict=False, assign=True)
    model.init_derived_buffers()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not missing, f"parameters left unloaded: {missing[:3]}"
    return model.to(device=device).eval().requires_grad_(False)
