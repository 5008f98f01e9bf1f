"""The Kandinsky 4.0 T2V Flash diffusion transformer (docs/model.md "DiT forward").

Module and parameter names reproduce the published state-dict keys exactly, so the
published checkpoint loads strictly. The model knows nothing about ranks: heads are
reshaped with -1 from the local weight shapes, so a tensor-parallel plan applied from
outside (parallel/) only has to shard weights and reduce the row-parallel outputs.

Visual and text tokens of a video travel as one sequence (B, N + L, D): visual first,
then text. The shared layers (QKV, attention output, feed-forward) run once over both
streams; only the modulation differs per stream.
"""
import math
from collections import OrderedDict

import torch
from einops import rearrange
from torch import nn

from .dit_math import (DEFAULT_SDPA_BACKENDS, apply_rope, attention_backends, joint_attention, rope_angle_table,
                       rope_cos_sin, sinusoid_freqs)
from .published import PUBLISHED_DIT_PARAMS, ROPE_MAX_POSITIONS  # noqa: F401 (re-exported)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim, time_dim):
        super().__init__()
        self.num_freqs = model_dim // 2
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, time_dim)
        # Not a buffer: it must stay float32 when the model is cast to bf16 (the angles
        # reach ~1000 rad), and it is not in the published state dict.
        self._freqs = {}

    def freqs(self, device):
        if device not in self._freqs:  # made on the CPU as the official code does, copied once per device
            self._freqs[device] = sinusoid_freqs(self.num_freqs).to(device)
        return self._freqs[device]

    def forward(self, timestep):  # (B,) float, scheduler time in [0, 1000)
        args = timestep.float()[:, None] * self.freqs(timestep.device)[None, :]  # (B, model_dim/2)
        embed = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        embed = embed.to(self.in_layer.weight.dtype)
        return self.out_layer(self.activation(self.in_layer(embed)))  # (B, time_dim)


class TextEmbeddings(nn.Module):
    def __init__(self, in_text_dim, model_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_text_dim, model_dim)

    def forward(self, text_embed):
        return self.in_layer(text_embed)


class VisualEmbeddings(nn.Module):
    def __init__(self, in_visual_dim, model_dim, patch_size):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = nn.Linear(math.prod(patch_size) * in_visual_dim, model_dim)

    def forward(self, x):  # (B, F, H, W, C)
        pf, ph, pw = self.patch_size
        # Patch vector ordered (pt, ph, pw, C), C fastest (docs/model.md "DiT forward" step 3).
        patches = rearrange(x, "b (f pf) (h ph) (w pw) c -> b (f h w) (pf ph pw c)", pf=pf, ph=ph, pw=pw)
        return self.in_layer(patches)  # (B, N, D)


class RoPE3D(nn.Module):
    """cos/sin of the 3D RoPE angles for a patch grid (docs/model.md "DiT forward" step 4).

    The `args_{i}` buffers exist for state-dict compatibility only: the tables are
    recomputed from the config in float32, because a model cast to bf16 would round
    the buffers (an angle of 100 rad loses ~0.5 rad). cos/sin depend only on the grid,
    so they are built once per grid and device and shared by all blocks and steps.

    Only the per-axis frequencies come from the host (made on the CPU, as the official code
    does, and copied once per device); the angle tables and cos/sin of a grid are built on the
    device that uses them, so a new grid costs no host copy, and kept for the last `cache_size`
    grids, so a server alternating video sizes builds each size's tables once (the published
    12 s grid: 13 MB on the device).
    """
    cache_size = 4

    def __init__(self, axes_dims, max_pos=ROPE_MAX_POSITIONS):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.max_pos = max_pos
        self.reset_buffers()

    def reset_buffers(self):
        for i, axis_dim in enumerate(self.axes_dims):
            self.register_buffer(f"args_{i}", rope_angle_table(axis_dim, self.max_pos))
        self._tables = OrderedDict()  # (grid, device) → (cos, sin), least recently used first
        self._freqs = {}  # device → each axis's frequencies there

    def forward(self, grid, device):  # grid: (F, H, W) in patches
        key = (tuple(grid), torch.device(device))  # cos/sin are float32 whatever the model's dtype
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        device = key[1]
        if device not in self._freqs:
            self._freqs[device] = [sinusoid_freqs(axis_dim // 2).to(device) for axis_dim in self.axes_dims]
        tables = [rope_angle_table(axis_dim, self.max_pos, freqs)
                  for axis_dim, freqs in zip(self.axes_dims, self._freqs[device])]
        self._tables[key] = rope_cos_sin(tables, grid)
        while len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return self._tables[key]


class Modulation(nn.Module):
    def __init__(self, time_dim, model_dim):
        super().__init__()
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, 6 * model_dim)

    def forward(self, time_embed):  # (B, time_dim)
        # attn shift, attn scale, attn gate, ff shift, ff scale, ff gate; each (B, 1, D)
        return self.out_layer(self.activation(time_embed)).unsqueeze(1).chunk(6, dim=-1)


class MultiheadSelfAttention(nn.Module):
    def __init__(self, model_dim, head_dim):
        super().__init__()
        if model_dim % head_dim:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.to_query_key_value = nn.Linear(model_dim, 3 * model_dim)  # rows [q; k; v]
        self.query_norm = nn.LayerNorm(head_dim)
        self.key_norm = nn.LayerNorm(head_dim)
        self.output_layer = nn.Linear(model_dim, model_dim)

    def forward(self, x, num_visual, rope_cos, rope_sin, attention):  # x: (B, S, D), visual tokens first
        qkv = self.to_query_key_value(x).unflatten(-1, (3, -1, self.head_dim))  # (B, S, 3, heads, head_dim)
        out = attend(qkv, self.query_norm, self.key_norm, num_visual, rope_cos, rope_sin, attention)
        return self.output_layer(out)  # out: (B, S, heads * head_dim)


def attend(qkv, query_norm, key_norm, num_visual, rope_cos, rope_sin, attention):
    """Per-head q/k norms, RoPE on the visual tokens, then `attention` (q, k, v → out, each (B, heads, S, head_dim);
    the DiT passes its own): (B, S, 3, heads, head_dim) → (B, S, heads·head_dim).

    Any subset of heads works (a tensor- or sequence-parallel plan passes its own); the sequence must be
    whole, visual tokens first (num_visual of them, matching rope_cos/sin's rows).
    """
    query, key, value = qkv.unbind(2)  # strided views into the packed projection
    query = query_norm(query).type_as(query).transpose(1, 2)  # (B, heads, S, head_dim)
    key = key_norm(key).type_as(key).transpose(1, 2)
    # A plain (B, heads, S, head_dim) tensor like q and k (the RoPE concatenation below makes those):
    # SDPA backends have had NaN and memory bugs with v as a strided view of a packed QKV
    # (docs/model.md "DiT forward" step 5).
    value = value.transpose(1, 2).contiguous()
    # RoPE on the visual tokens only (docs/model.md "DiT forward" step 4); text keeps its q, k.
    query = torch.cat([apply_rope(query[:, :, :num_visual], rope_cos, rope_sin), query[:, :, num_visual:]], dim=2)
    key = torch.cat([apply_rope(key[:, :, :num_visual], rope_cos, rope_sin), key[:, :, num_visual:]], dim=2)
    return attention(query, key, value).transpose(1, 2).flatten(2)  # (B, S, heads * head_dim)


class FeedForward(nn.Module):
    def __init__(self, model_dim, ff_dim):
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim)
        self.activation = nn.GELU()  # exact (erf)
        self.out_layer = nn.Linear(ff_dim, model_dim)

    def forward(self, x):
        return self.out_layer(self.activation(self.in_layer(x)))


def _modulate(x, num_visual, visual_shift, visual_scale, text_shift, text_scale):
    visual, text = x[:, :num_visual], x[:, num_visual:]
    return torch.cat([visual * (visual_scale + 1.0) + visual_shift, text * (text_scale + 1.0) + text_shift], dim=1)


def _gated_residual(x, update, num_visual, visual_gate, text_gate):
    gated = torch.cat([visual_gate * update[:, :num_visual], text_gate * update[:, num_visual:]], dim=1)
    return x + gated


class TransformerBlock(nn.Module):
    def __init__(self, model_dim, time_dim, ff_dim, head_dim):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim)
        self.text_modulation = Modulation(time_dim, model_dim)
        self.self_attention_norm = nn.LayerNorm(model_dim)
        self.self_attention = MultiheadSelfAttention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, num_visual, time_embed, rope_cos, rope_sin, attention):  # x: (B, N + L, D)
        v_shift, v_scale, v_gate, v_ff_shift, v_ff_scale, v_ff_gate = self.visual_modulation(time_embed)
        t_shift, t_scale, t_gate, t_ff_shift, t_ff_scale, t_ff_gate = self.text_modulation(time_embed)

        h = _modulate(self.self_attention_norm(x), num_visual, v_shift, v_scale, t_shift, t_scale)
        update = self.self_attention(h, num_visual, rope_cos, rope_sin, attention)
        x = _gated_residual(x, update, num_visual, v_gate, t_gate)

        h = _modulate(self.feed_forward_norm(x), num_visual, v_ff_shift, v_ff_scale, t_ff_shift, t_ff_scale)
        return _gated_residual(x, self.feed_forward(h), num_visual, v_ff_gate, t_ff_gate)


class OutLayer(nn.Module):
    def __init__(self, model_dim, time_dim, out_visual_dim, patch_size):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.norm = nn.LayerNorm(model_dim)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * out_visual_dim)
        self.modulation_activation = nn.SiLU()
        self.modulation_out = nn.Linear(time_dim, 2 * model_dim)

    def forward(self, tokens, num_visual, time_embed, grid):  # tokens: (B, N + L, D), visual first
        return self.unpatchify(self.project(tokens[:, :num_visual], time_embed), grid)

    def project(self, visual, time_embed):  # (B, n, D) → (B, n, prod(patch) * C), token by token
        shift, scale = self.modulation_out(self.modulation_activation(time_embed)).unsqueeze(1).chunk(2, dim=-1)
        return self.out_layer(self.norm(visual) * (scale + 1.0) + shift)

    def unpatchify(self, out, grid):  # (B, N, prod(patch) * C) → (B, F, H, W, C)
        pf, ph, pw = self.patch_size
        f, h, w = grid
        # The output vector is ordered (C, pt, ph, pw), not the input order (docs/model.md "DiT forward" step 6).
        return rearrange(out, "b (f h w) (c pf ph pw) -> b (f pf) (h ph) (w pw) c",
                         f=f, h=h, w=w, pf=pf, ph=ph, pw=pw)  # (B, F, H, W, C)


class WholeSequence:
    """Which tokens this process's blocks see: all of them (the DiT's default `sequence`).

    A sequence-sharding plan gives the model its own object with the same method in its place
    (parallel/sequence.py `SequenceShards`): then each process's blocks see one shard of the tokens.
    """

    def shard(self, tokens, num_visual):  # tokens: (B, N + L, D), visual first
        """(the tokens the blocks run on, how many of them are visual)."""
        return tokens, num_visual


class DiffusionTransformer3D(nn.Module):
    """The DiT. The published model is `DiffusionTransformer3D(**PUBLISHED_DIT_PARAMS)` (k4flash/published.py).

    Two plain attributes are its seams, read at every forward: `attention`, the joint-attention function
    every block calls (q, k, v → out, each (B, heads, S, head_dim); k4flash/dit_math.py), and `sequence`,
    which tokens the blocks run on (`WholeSequence`). A cost counter swaps the first, a sequence-parallel
    plan the second; a tensor-parallel plan swaps layers (parallel/).
    """

    def __init__(self, *, in_visual_dim, in_text_dim, out_visual_dim, time_dim, patch_size, model_dim, ff_dim,
                 num_blocks, axes_dims):
        super().__init__()
        head_dim = sum(axes_dims)
        if any(d % 2 for d in axes_dims):
            raise ValueError(f"axes_dims {tuple(axes_dims)} must all be even (RoPE rotates pairs)")
        self.patch_size = tuple(patch_size)
        self.head_dim = head_dim
        self.time_embeddings = TimeEmbeddings(model_dim, time_dim)
        self.text_embeddings = TextEmbeddings(in_text_dim, model_dim)
        self.visual_embeddings = VisualEmbeddings(in_visual_dim, model_dim, patch_size)
        self.rope_embeddings = RoPE3D(axes_dims)
        self.transformer_blocks = nn.ModuleList([
            nn.ModuleList([TransformerBlock(model_dim, time_dim, ff_dim, head_dim) for _ in range(2)])
            for _ in range(num_blocks)
        ])
        self.out_layer = OutLayer(model_dim, time_dim, out_visual_dim, patch_size)
        self.sdpa_backends = DEFAULT_SDPA_BACKENDS  # the attention kernels allowed (k4flash/dit_math.py)
        self.attention = joint_attention
        self.sequence = WholeSequence()

    def compile_blocks(self, **compile_kwargs):
        """torch.compile every transformer block in place (nn.Module.compile); returns self.

        Blocks, not the whole model: the 42 blocks share one class, so one compiled graph
        serves all of them (parameters are graph inputs), and the compile costs one block's
        worth; the state-dict keys stay the published ones (no `_orig_mod.` prefix); the
        RoPE-table cache, the embeddings and a TP plan's modulation hook stay eager Python.
        The graph is specialised to the token count: a new geometry recompiles once, then
        dynamo marks the sizes dynamic. Collectives inside a block (parallel/comm.py) run
        eagerly between compiled pieces.
        """
        for pair in self.transformer_blocks:
            for block in pair:
                block.compile(**compile_kwargs)
        return self

    def init_derived_buffers(self):
        """Materialise the config-derived RoPE buffers on CPU (after a meta-device build)."""
        self.rope_embeddings.reset_buffers()

    def patch_grid(self, latent_shape):
        """(F, H, W) latent size → (F, H, W) patch grid; raises on sizes the patches do not tile."""
        if any(size % p for size, p in zip(latent_shape, self.patch_size)):
            raise ValueError(f"latent (F, H, W) = {tuple(latent_shape)} is not divisible by patch_size {self.patch_size}")
        return tuple(size // p for size, p in zip(latent_shape, self.patch_size))

    def forward(self, x, text_embed, timestep):
        """x: (B, F, H, W, C_in) latents; text_embed: (B, L, in_text_dim); timestep: (B,) → (B, F, H, W, C_out)."""
        grid = self.patch_grid(x.shape[1:4])
        time_embed = self.time_embeddings(timestep)  # (B, time_dim)
        visual = self.visual_embeddings(x)  # (B, N, D)
        tokens = torch.cat([visual, self.text_embeddings(text_embed)], dim=1)  # (B, N + L, D)
        num_visual = visual.shape[1]
        rope_cos, rope_sin = self.rope_embeddings(grid, x.device)
        # The blocks' share of the tokens (all of them unless a plan shards the sequence), and how many of those
        # are visual: the blocks' modulation and gated residuals treat the two streams apart.
        block_tokens, block_visual = self.sequence.shard(tokens, num_visual)
        # j = 0 ("local") and j = 1 ("global") blocks attend over the whole video at
        # num_groups = (1, 1, 1), the only published configuration.
        with attention_backends(self.sdpa_backends):  # out here: the blocks may be compiled, this stays eager
            for pair in self.transformer_blocks:
                for block in pair:
                    block_tokens = block(block_tokens, block_visual, time_embed, rope_cos, rope_sin, self.attention)
        return self.out_layer(block_tokens, num_visual, time_embed, grid)
