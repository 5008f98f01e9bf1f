"""A plan's tensor parallelism, applied to the DiT from outside the model (docs/parallel.md "Tensor-parallel plan").

Per transformer block:
- `to_query_key_value` is column-parallel with each of q, k, v split by heads, so a
  rank holds whole heads and the attention runs locally (the model reshapes heads
  with -1, so it needs no change);
- `output_layer` and `feed_forward.out_layer` are row-parallel: the one all-reduce
  each is the block's whole communication (visual and text tokens share the pass),
  i.e. 2 collectives per block;
- `feed_forward.in_layer` is column-parallel.
The modulation layers (2 per block + the output layer's, ~15 % of the published
weights) are row-sharded too, but their input is SiLU(time_embed) for every one of
them, so all of them are computed right after the time embedding and assembled with
ONE all-gather per forward instead of one per layer. Embeddings, norms and the final
projection are small and replicated.

Why own thin layers rather than DTensor's `parallelize_module`: the split needs a
fused-QKV split by thirds and a batched gather across 85 layers, both awkward as
DTensor placements; the plain-tensor layers keep the forward free of DTensor dispatch
and make every collective explicit and countable (parallel.comm).
"""
import torch
import torch.nn.functional as F
from torch import nn

from k4flash import fp8
from k4flash.fp8 import Fp8Linear, QuantizableLinear
from k4flash.weights import slice_reader

from . import comm
from .plan import validate_plan_degrees
from .sequence import shard_sequence

COLWISE, COLWISE_QKV, ROWWISE, GATHERED = "colwise", "colwise_qkv", "rowwise", "gathered"


def dit_shard_styles(num_blocks: int) -> dict:
    """Module path → sharding style; modules not named are replicated."""
    styles = {}
    for i in range(num_blocks):
        for j in range(2):
            block = f"transformer_blocks.{i}.{j}"
            styles[f"{block}.self_attention.to_query_key_value"] = COLWISE_QKV
            styles[f"{block}.self_attention.output_layer"] = ROWWISE
            styles[f"{block}.feed_forward.in_layer"] = COLWISE
            styles[f"{block}.feed_forward.out_layer"] = ROWWISE
            styles[f"{block}.visual_modulation.out_layer"] = GATHERED
            styles[f"{block}.text_modulation.out_layer"] = GATHERED
    styles["out_layer.modulation_out"] = GATHERED
    return styles


def shard_rows(style, rows: int, rank: int, world: int) -> list:
    """Row ranges [(start, stop)] of a weight/bias this rank keeps for a column-style shard."""
    if style == COLWISE_QKV:
        third = rows // 3
        return [(part * third + rank * third // world, part * third + (rank + 1) * third // world) for part in range(3)]
    return [(rank * rows // world, (rank + 1) * rows // world)]


def take_shard(read, style, kind: str, shape, rank: int, world: int) -> torch.Tensor:
    """This rank's piece of one parameter.

    read(rows=(start, stop) | None, cols=(start, stop) | None) returns that block of the
    full tensor (so a caller can slice a file without loading the whole tensor).
    """
    if style == ROWWISE:
        if kind != "weight":  # bias and FP8 scale belong to the output rows: whole on every rank; one adds the bias
            return read(None, None)
        cols = shape[1]
        return read(None, (rank * cols // world, (rank + 1) * cols // world))
    return torch.cat([read((a, b), None) for a, b in shard_rows(style, shape[0], rank, world)])


class RowParallelLinear(QuantizableLinear):
    """y = all_reduce(x_local @ W_localᵀ (+ b on one rank)): the input features are this rank's heads / ff slice.

    scatter_tokens (sequence parallelism): reduce-scatter over the tokens instead, so each rank
    keeps the sum for its own shard of them.
    """

    def __init__(self, in_local, out_features, group, scatter_tokens=False, adds_bias=False, device=None,
                 dtype=None):
        super().__init__()
        self.group, self.scatter_tokens, self.adds_bias = group, scatter_tokens, adds_bias
        self.weight = nn.Parameter(torch.empty(out_features, in_local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def forward(self, x):  # (B, S, in_local) → (B, S, out), or (B, S / k, out) with scatter_tokens
        # The bias rides in one rank's matmul (adds_bias: the group's first), so the sum carries it once and no
        # rank spends a pass over the output adding it.
        return self.reduce(fp8.linear(self, x, self.bias if self.adds_bias else None))

    def reduce(self, partial):
        """The group's sum of every rank's partial output (this rank's token shard of it with scatter_tokens)."""
        if self.scatter_tokens:
            return comm.reduce_scatter_tokens(partial, self.group)
        return comm.all_reduce_sum(partial, self.group)


class TokenGatherLinear(QuantizableLinear):
    """Column-parallel under sequence parallelism: all-gather the group's token shards, then this rank's rows."""

    def __init__(self, in_features, out_local, group, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_local, device=device, dtype=dtype))

    def forward(self, x):  # (B, S / k, in) → (B, S, out_local)
        return fp8.linear(self, comm.all_gather_tokens(x, self.group), self.bias)


class GatheredLinear(nn.Module):
    """A row shard of a modulation layer; `ModulationGather` fills in the full output."""

    def __init__(self, out_local, in_features, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_local, device=device, dtype=dtype))
        self.gathered = None

    def forward(self, x):  # x = SiLU(time_embed), already consumed by the gather
        if self.gathered is None:
            raise RuntimeError("GatheredLinear called before the modulation gather ran (was parallelize_dit applied?)")
        out, self.gathered = self.gathered, None
        return out


class ModulationGather:
    """Forward hook on `time_embeddings`: every modulation of the forward in one all-gather."""

    def __init__(self, layers, group, world):
        self.layers, self.group, self.world = layers, group, world

    def __call__(self, module, inputs, time_embed):
        hidden = F.silu(time_embed)  # each modulation layer reads SiLU(time_embed) (docs/model.md "DiT forward")
        local = torch.cat([F.linear(hidden, layer.weight, layer.bias) for layer in self.layers], dim=-1)
        full = comm.all_gather_last_dim(local, self.group).unflatten(-1, (self.world, -1))  # (B, world, Σ n_local)
        offset = 0
        for layer in self.layers:
            n = layer.weight.shape[0]
            layer.gathered = full[..., offset:offset + n].flatten(-2)  # rank-major rows = the full output
            offset += n


def _replacement(style, linear: nn.Linear, group, rank, world, sequence_parallel):
    out_features, in_features = linear.weight.shape
    kw = dict(device=linear.weight.device, dtype=linear.bias.dtype)
    quantized = getattr(linear, "weight_scale", None) is not None  # an Fp8Linear (k4flash/fp8.py)
    if style == ROWWISE:
        new = RowParallelLinear(in_features // world, out_features, group, scatter_tokens=sequence_parallel,
                                adds_bias=rank == 0, **kw)
    elif style == GATHERED:
        return GatheredLinear(out_features // world, in_features, **kw)
    elif sequence_parallel:
        new = TokenGatherLinear(in_features, out_features // world, group, **kw)
    else:
        new = (Fp8Linear if quantized else nn.Linear)(in_features, out_features // world, **kw)
    if quantized:  # the shard's shapes in e4m3 + float32 scales; filled below or by the sharded loader
        rows, cols = new.weight.shape
        new.make_fp8(torch.empty(rows, cols, dtype=fp8.FP8, device=kw["device"]),
                     torch.empty(rows, dtype=torch.float32, device=kw["device"]))
    return new


def mesh_coords(mesh) -> tuple:
    """(process group, this rank's index in it, its size) of a 1-D DeviceMesh, or of such a tuple as given."""
    if hasattr(mesh, "get_group"):
        return mesh.get_group(), mesh.get_local_rank(), mesh.size()
    return tuple(mesh)


ALONE = (None, 0, 1)  # the coordinates of a mesh dimension of size 1


def dit_mesh_coords(mesh) -> tuple:
    """((tp group, index, size), (ulysses group, index, size)) of the mesh parallelize_dit takes.

    A 1-D mesh (or a (group, rank, size) tuple) is tensor parallelism alone; a 2-D DeviceMesh
    must be named ("ulysses", "tp"), either size may be 1.
    """
    if getattr(mesh, "ndim", 1) == 1:
        return mesh_coords(mesh), ALONE
    if tuple(mesh.mesh_dim_names or ()) != ("ulysses", "tp"):
        raise ValueError(f"a 2-D DiT mesh must have mesh_dim_names ('ulysses', 'tp'), got {mesh.mesh_dim_names}")
    tp, ulysses = mesh["tp"], mesh["ulysses"]
    coords = [mesh_coords(dim) if dim.size() > 1 else ALONE for dim in (tp, ulysses)]
    return tuple(coords)


def _model_params(model) -> dict:
    return {"model_dim": model.out_layer.norm.normalized_shape[0], "axes_dims": model.rope_embeddings.axes_dims,
            "ff_dim": model.transformer_blocks[0][0].feed_forward.in_layer.out_features}


def parallelize_dit(model, mesh, *, sequence_parallel: bool = False):
    """Shard `model` in place over a DiT mesh (see dit_mesh_coords); returns it.

    1-D mesh: tensor parallelism (2 all-reduces per block). 2-D ("ulysses", "tp") mesh: the tokens are
    split over the Ulysses ranks through every block (two all-to-alls around attention, weights whole
    over U), and the weights over the TP ranks. sequence_parallel: the TP ranks split the tokens too,
    with all-gathers and reduce-scatters in place of the all-reduces (parallel/sequence.py); nothing
    to do at tp = 1. The forward still takes and returns the full (B, F, H, W, C) latents on every rank.

    Works on a meta-device model (shapes only; load weights afterwards with parallel.load) or on a
    loaded one (each rank keeps its slice of the weights). Refuses degrees that do not divide the heads
    and widths, naming the allowed ones.
    """
    tp, ulysses = dit_mesh_coords(mesh)
    (tp_group, rank, world), sequence_parallel = tp, sequence_parallel and tp[2] > 1
    validate_plan_degrees(_model_params(model), world, ulysses[2])
    if world > 1:
        gathered = []
        for path, style in dit_shard_styles(len(model.transformer_blocks)).items():
            parent_path, name = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            linear = getattr(parent, name)
            new = _replacement(style, linear, tp_group, rank, world, sequence_parallel)
            if linear.weight.device.type != "meta":
                with torch.no_grad():
                    for kind in ("weight", "bias", "weight_scale")[:3 if hasattr(new, "weight_scale") else 2]:
                        full = getattr(linear, kind)
                        piece = take_shard(slice_reader(full), style, kind, full.shape, rank, world)
                        getattr(new, kind).copy_(piece)
            setattr(parent, name, new)
            if style == GATHERED:
                gathered.append(new)
        model.time_embeddings.register_forward_hook(ModulationGather(gathered, tp_group, world))
    if ulysses[2] > 1 or sequence_parallel:
        shard_sequence(model, tp, ulysses, sequence_parallel)
    model.tp_degree = world  # read by sharded_parameters (the sharded loader)
    return model


def sharded_parameters(model) -> dict:
    """parameter name → (style, full shape) for every sharded parameter of a parallelized model."""
    world = getattr(model, "tp_degree", 1)
    out = {}
    if world == 1:
        return out
    for path, style in dit_shard_styles(len(model.transformer_blocks)).items():
        module = model.get_submodule(path)
        for kind in ("weight", "bias", "weight_scale"):
            if not hasattr(module, kind):
                continue
            local = tuple(getattr(module, kind).shape)
            if style == ROWWISE:
                full = (local[0], local[1] * world) if kind == "weight" else local
            else:
                full = (local[0] * world,) + local[1:]
            out[f"{path}.{kind}"] = (style, full)
    return out
