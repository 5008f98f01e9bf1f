"""Sharded DiT loading: each rank materialises only its shard (docs/parallel.md "Sharded loading").

build on meta → check the file's keys and shapes against the full model → apply the
plan on meta (TP shards; Ulysses and sequence parallelism only swap the attention, the output layer and the
DiT's sequence seam) → read each parameter's slice (safetensors `get_slice`, or a
memory-mapped .pt) → move → eval. `python -m parallel.convert` turns the published .pt
into the .safetensors file this prefers.
"""
import torch

from k4flash import fp8
from k4flash.checkpoint_check import check_dit_checkpoint
from k4flash.dit import DiffusionTransformer3D
from k4flash.weights import check_checkpoint, open_checkpoint, owned_copy

from .plan import validate_plan_degrees
from .tp import dit_mesh_coords, parallelize_dit, sharded_parameters, take_shard


def load_dit_sharded(params: dict, checkpoint_path, mesh, device="cpu", dtype=torch.float32, *,
                     sequence_parallel: bool = False, quantize: str = "none", fp8_skip=()):
    """A DiT holding this rank's shard, loaded from the published checkpoint (or its FP8 conversion); mesh: as
    parallelize_dit's. quantize="fp8": the big linears in e4m3 (k4flash/fp8.py), their scales sharded with their
    rows; from a bf16 file they are quantized while loading, to the same bits as `parallel.convert --quantize fp8`."""
    (_, rank, world), (_, _, ulysses) = dit_mesh_coords(mesh)
    validate_plan_degrees(params, world, ulysses)  # before touching the file
    fp8.validate_quantize(quantize, fp8_skip, params["num_blocks"])
    check_dit_checkpoint(checkpoint_path, quantize)  # a truncated or corrupt file: before the model is built
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    if quantize == "fp8":
        fp8.quantize_dit(model, fp8_skip)  # before the plan: its layers take the FP8 shapes
    source, path = open_checkpoint(checkpoint_path, model)
    check_checkpoint(source, path, model)
    parallelize_dit(model, mesh, sequence_parallel=sequence_parallel)
    sharded = sharded_parameters(model)
    state = {}
    readers = fp8.tensor_readers(source, model)
    for name, param in model.named_parameters():
        read = readers[name]
        if name in sharded:
            style, full_shape = sharded[name]
            piece = take_shard(read, style, name.rsplit(".", 1)[1], full_shape, rank, world)
        else:
            piece = read(None, None)
        state[name] = owned_copy(piece, device, fp8.load_dtype(name, param.dtype, dtype))  # no view into the file
    model.load_state_dict(state, strict=False, assign=True)
    model.init_derived_buffers()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not missing, f"parameters left unloaded: {missing[:3]}"
    return model.to(device=device).eval().requires_grad_(False)
