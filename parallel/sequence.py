"""Sequence sharding for the DiT: Ulysses attention and Megatron-style sequence-parallel TP
(docs/parallel.md "Sequence sharding").

Between blocks each rank holds one contiguous shard of the joint sequence (visual tokens,
then text, zero-padded at the end to a multiple of the shard count). Because the visual
tokens come first, a shard is some visual tokens followed by some text tokens, so the
blocks' per-stream modulation and gated residuals run unchanged on a shard when they are
given the shard's own visual count. Only attention needs the whole sequence:

- Ulysses (U ranks): one all-to-all turns (tokens / U, all local heads) into (all tokens,
  heads / U) before attention and one turns it back after; weights are whole over U.
- Sequence-parallel TP (K ranks): column-parallel layers all-gather their input tokens
  over the TP group, row-parallel layers reduce-scatter their output (parallel/tp.py).

Both compose: tokens are split U·K ways (u-major), the TP all-gather restores the Ulysses
shard. Padding never reaches the attention: it is cut after the sequence is whole and put
back before it is split again. The split happens where the DiT's forward asks its `sequence`
seam for the blocks' tokens (k4flash/dit.py `WholeSequence`): `shard_sequence` puts a
`SequenceShards` there. The output layer projects each rank's own visual tokens and gathers
the patch outputs (prod(patch)·C = 64 values per token instead of D = 3072).
"""
import math

import torch.nn.functional as F
from torch import nn

from k4flash import fp8
from k4flash.dit import OutLayer, attend

from . import comm


class SequenceShards:
    """This rank's share of the joint sequence during the current forward: the DiT's `sequence` under a plan.

    `levels`: (group, index, size) from the outermost split to the innermost; the shard index
    is u·K + k for (ulysses, tp), so each TP group's shards together are one Ulysses shard.
    """

    def __init__(self, levels):
        self.levels = [level for level in levels if level[2] > 1]
        self.count = math.prod(size for _, _, size in self.levels)
        self.index = 0
        for _, index, size in self.levels:
            self.index = self.index * size + index
        self.total = self.num_visual = None

    def shard(self, tokens, num_visual: int):
        """The DiT's seam: (this rank's shard of the (B, S, D) tokens, how many of the shard's tokens are visual).
        Remembers the whole sequence's layout for the attention and the output layer of this forward."""
        self.num_visual, self.total = num_visual, tokens.shape[1]
        return self.split(tokens), self.local_visual

    @property
    def padded(self) -> int:
        return -(-self.total // self.count) * self.count

    @property
    def local(self) -> int:
        return self.padded // self.count

    @property
    def local_visual(self) -> int:
        start = self.index * self.local
        return min(max(self.num_visual - start, 0), self.local)

    def pad(self, tokens):  # (B, S, ...) → (B, S_pad, ...): zeros at the end, no copy when none are needed
        if self.padded == self.total:
            return tokens
        return F.pad(tokens, (0, 0) * (tokens.ndim - 2) + (0, self.padded - self.total))

    def split(self, tokens):  # (B, S, D) → (B, S_pad / count, D)
        return self.pad(tokens)[:, self.index * self.local:(self.index + 1) * self.local]

    def gather(self, rows):  # (B, S_pad / count, n) → (B, S_pad, n), innermost level first
        for group, _, _ in reversed(self.levels):
            rows = comm.all_gather_tokens(rows, group)
        return rows


def sequence_to_heads(qkv, group, size):
    """(B, s, 3, h, hd) with this rank's tokens → (B, size·s, 3, h/size, hd) with its share of the heads."""
    blocks = qkv.unflatten(3, (size, -1)).permute(3, 0, 1, 2, 4, 5)  # (size, B, s, 3, h/size, hd): block j → rank j
    received = comm.all_to_all(blocks, group)  # block j: rank j's tokens, this rank's heads
    return received.transpose(0, 1).flatten(1, 2)  # (B, size·s, 3, h/size, hd)


def heads_to_sequence(out, group, size):
    """(B, size·s, w) for this rank's heads → (size, B, s, w): block j holds rank j's heads for this rank's tokens
    (the inverse all-to-all; `project_head_blocks` applies the output layer without reassembling the heads)."""
    blocks = out.unflatten(1, (size, -1)).transpose(0, 1)  # (size, B, s, w): rank j's tokens at [j]
    return comm.all_to_all(blocks, group)


def project_head_blocks(layer, blocks):
    """layer(x) for x = the head blocks side by side, as one matmul per block into one output.

    Putting the blocks side by side would copy the whole attention output; a column slice of the
    weight per block reads it where it lies. `layer`: an nn.Linear, or a RowParallelLinear (then
    this rank's partial sum, bias on one rank, goes to its reduction).
    """
    size, width = blocks.shape[0], blocks.shape[-1]
    weight = layer.weight  # (out, size · width): block j's columns at j · width
    with_bias = getattr(layer, "adds_bias", True)
    if getattr(layer, "weight_scale", None) is not None:
        # FP8: one activation scale per token over its whole row, as on one rank; quantizing copies it anyway
        whole = blocks.permute(1, 2, 0, 3).flatten(2)  # (size, B, s, w) → (B, s, size · w)
        out = fp8.linear(layer, whole, layer.bias if with_bias else None)
        return layer.reduce(out) if hasattr(layer, "reduce") else out
    out = F.linear(blocks[0], weight[:, :width], layer.bias if with_bias else None)  # (B, s, out)
    flat = out.view(-1, out.shape[-1])
    for j in range(1, size):
        flat.addmm_(blocks[j].reshape(-1, width), weight[:, j * width:(j + 1) * width].t())
    return layer.reduce(out) if hasattr(layer, "reduce") else out


class ShardedSequenceAttention(nn.Module):
    """The block's self-attention when tokens arrive sharded: make the sequence whole, attend, shard it again.

    Holds the original layers under their own names, so the state-dict keys stay the published ones.
    """

    def __init__(self, attention, shards: SequenceShards, ulysses):
        super().__init__()
        self.head_dim = attention.head_dim
        self.to_query_key_value = attention.to_query_key_value  # column-parallel under TP (+ token gather under SP)
        self.query_norm, self.key_norm = attention.query_norm, attention.key_norm
        self.output_layer = attention.output_layer  # row-parallel under TP (+ token scatter under SP)
        self.shards = shards
        self.ulysses_group, _, self.ulysses_size = ulysses

    def forward(self, x, num_visual, rope_cos, rope_sin, attention):  # x: (B, s, D); num_visual: the shard's
        shards = self.shards
        qkv = self.to_query_key_value(x).unflatten(-1, (3, -1, self.head_dim))  # (B, s_u, 3, heads, hd)
        if self.ulysses_size > 1:
            qkv = sequence_to_heads(qkv, self.ulysses_group, self.ulysses_size)  # (B, S_pad, 3, heads/U, hd)
        out = attend(qkv[:, :shards.total], self.query_norm, self.key_norm, shards.num_visual, rope_cos, rope_sin,
                     attention)
        out = shards.pad(out)  # (B, S_pad, heads/U · hd)
        if self.ulysses_size == 1:
            return self.output_layer(out)
        blocks = heads_to_sequence(out, self.ulysses_group, self.ulysses_size)  # (U, B, s_u, heads/U · hd)
        return project_head_blocks(self.output_layer, blocks)


class ShardedOutLayer(nn.Module):
    """The output layer on this rank's visual tokens; the (much narrower) patch outputs are gathered.

    Holds the original's layers under their own names (the published keys stay) and runs its math
    (OutLayer.project, OutLayer.unpatchify).
    """

    def __init__(self, out_layer: OutLayer, shards: SequenceShards):
        super().__init__()
        self.patch_size = out_layer.patch_size
        self.norm, self.out_layer = out_layer.norm, out_layer.out_layer
        self.modulation_activation, self.modulation_out = out_layer.modulation_activation, out_layer.modulation_out
        self.shards = shards

    def forward(self, tokens, num_visual, time_embed, grid):  # tokens: (B, s, D), this rank's shard
        shards = self.shards
        out = OutLayer.project(self, tokens[:, :shards.local_visual], time_embed)  # (B, v, P·C), v ≤ s
        out = F.pad(out, (0, 0, 0, shards.local - out.shape[1]))  # (B, s, P·C): shard i's rows at i·s
        return OutLayer.unpatchify(self, shards.gather(out)[:, :num_visual], grid)  # visual tokens lead


def shard_sequence(model, tp, ulysses, sequence_parallel: bool) -> SequenceShards:
    """Put the token split in the DiT's `sequence` seam and the sharded attention and output layer in place;
    tp, ulysses: (group, index, size)."""
    shards = SequenceShards([ulysses, tp if sequence_parallel else (None, 0, 1)])
    model.sequence = shards
    for pair in model.transformer_blocks:
        for block in pair:
            block.self_attention = ShardedSequenceAttention(block.self_attention, shards, ulysses)
    model.out_layer = ShardedOutLayer(model.out_layer, shards)
    return shards
