"""Exact row-parallel decode of the CogVideoX VAE: every rank of a model group decodes a band of latent rows.

The diffusers decoder mixes rows in only three ways, and each is made exact here (docs/parallel.md
"Row-split VAE decode"; checked against diffusers' autoencoder_kl_cogvideox.py and upsampling.py):

* 3×3 convolutions with zero padding (the causal 3D convs, the upsamplers' 2D convs). Their H padding
  is removed and, just before each conv, one row from each neighbouring band is concatenated above and
  below (zeros at the global top and bottom). The hook sits on the inner nn.Conv3d / nn.Conv2d, so the
  rows are exchanged after the causal time cache is prepended and after an upsampler's nearest 2×, at
  that conv's input resolution. The time cache itself stays per rank (its own rows, no halo).
* GroupNorm, whose statistics span channels-per-group × frames × the full height and width: replaced by
  RowShardedGroupNorm (same Parameter objects), which all-reduces per-(batch, group) counts, sums and
  sums of squares over the ranks.
* SpatialNorm3D's nearest interpolation of the latent and the upsamplers' nearest 2×: both are integer
  scales of a band that starts on a latent-row boundary, so they are local and exact on the band.

Everything else (SiLU, the 1×1 convs, the time-only logic) is per pixel. Frame chunking is unchanged.
The VAE keeps its class and weights; `RowParallelVAE.remove()` undoes the wrapping.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from k4flash.geometry import RESOLUTIONS, VAE_SPATIAL_FACTOR
from k4flash.vae import decode_scaled, scaled_latents, to_uint8_frames

from . import comm

log = logging.getLogger("k4flash")

# Leaf modules of the decoder that never look at neighbouring rows; any other leaf type is refused,
# so a diffusers change that adds a row-mixing layer fails loudly instead of decoding wrong frames.
_ROW_LOCAL_LEAVES = (nn.SiLU, nn.Dropout, nn.Identity, nn.Linear)


@dataclass
class _Band:
    """The split of the current decode: this rank is `index` of `size` ranks in `group`."""
    group: object
    index: int
    size: int


def ranks_for_height(latent_height: int, group_size: int) -> int:
    """How many ranks decode: the largest divisor of the latent height that is at most the group size."""
    return max(k for k in range(1, min(group_size, latent_height) + 1) if latent_height % k == 0)


class RowShardedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm over a row band whose statistics are those of the full height (summed over the ranks).

    Holds the replaced norm's own Parameter objects (state-dict keys unchanged). Outside a parallel
    decode it is torch's GroupNorm exactly.
    """

    def __init__(self, norm: nn.GroupNorm, wrapping: "RowParallelVAE"):
        nn.Module.__init__(self)
        self.num_groups, self.num_channels, self.eps, self.affine = (
            norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.weight, self.bias = norm.weight, norm.bias
        self._wrapping = wrapping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = self._wrapping.band
        if band is None:
            return super().forward(x)
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, -1)  # (B, G, C/G · T · h · W)
        # Welford var_mean per rank (accurate in float32), combined as count, sum and sum of squares in
        # float64 so that E[x²] − E[x]² does not cancel.
        var, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)  # (B, G) each
        count = torch.full_like(mean, grouped.shape[-1], dtype=torch.float64)
        mean = mean.double()
        stats = torch.stack([count, count * mean, count * (var.double() + mean * mean)])  # (3, B, G)
        comm.all_reduce_sum(stats, band.group)
        count, total, total_squares = stats
        mean = total / count
        var = (total_squares / count - mean * mean).clamp_min(0)
        rstd = torch.rsqrt(var.float() + self.eps)  # (B, G)
        per_channel = channels // self.num_groups
        scale = rstd.repeat_interleave(per_channel, dim=1)  # (B, C)
        shift = -mean.float().repeat_interleave(per_channel, dim=1) * scale
        if self.affine:
            scale, shift = scale * self.weight.float(), shift * self.weight.float() + self.bias.float()
        broadcast = (batch, channels) + (1,) * (x.ndim - 2)  # (B, C, 1, ..., 1)
        return torch.addcmul(shift.view(broadcast), x.float(), scale.view(broadcast)).to(x.dtype)


class RowParallelVAE:
    """The wrapping applied by `parallelize_vae`: halo hooks on the convs, RowShardedGroupNorm for the norms.

    `band` is set only during `decode`; outside it the wrapped VAE decodes alone as before.
    """

    def __init__(self, vae, groups: dict, index: int, rank: int, make_group=None):
        self.vae = vae
        self.groups = groups  # number of ranks used → the process group of this model group's first that many
        self.size = max(groups)  # the model group's size
        # make_group(k) → the group of the first k ranks, made when a geometry first needs it (every rank of the
        # job is in this decode); None: `groups` already holds every size the allowed geometries use.
        self.make_group = make_group
        self.index = index  # this rank's position in its model group
        self.rank = rank
        self.band: _Band | None = None
        self._warned_heights = set()
        self._hooks, self._paddings, self._norms = [], [], []
        for name, module in list(vae.decoder.named_modules()) + [("post_quant_conv", vae.post_quant_conv)]:
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                self._wrap_conv(name, module)
            elif isinstance(module, nn.GroupNorm):
                parent_name, _, attribute = name.rpartition(".")
                parent = vae.decoder.get_submodule(parent_name)
                setattr(parent, attribute, RowShardedGroupNorm(module, self))
                self._norms.append((parent, attribute, module))
            elif module is not None and not list(module.children()) and not isinstance(module, _ROW_LOCAL_LEAVES):
                self.remove()
                raise NotImplementedError(
                    f"row-parallel VAE decode does not know whether decoder.{name} ({type(module).__name__}) "
                    "mixes rows; decode on one rank (vae.parallel=false)")
        vae._k4flash_row_parallel = self

    def _wrap_conv(self, name, conv):
        h = conv.weight.ndim - 4  # index of H in kernel_size / padding: (T, H, W) for 3D, (H, W) for 2D
        kernel, pad = conv.kernel_size[h], conv.padding[h]
        if kernel == 1 and pad == 0:
            return  # per row already
        if (conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.stride[h] != 1
                or conv.dilation[h] != 1 or kernel != 2 * pad + 1):
            self.remove()
            raise NotImplementedError(
                f"row-parallel VAE decode handles stride-1, zero-padded 'same' convs only; decoder.{name} has "
                f"kernel {conv.kernel_size}, padding {conv.padding} ({conv.padding_mode}), stride {conv.stride}")
        self._paddings.append((conv, conv.padding))
        padding = list(conv.padding)
        padding[h] = 0  # the rows come from the neighbours (or zeros at the edges) in the hook instead
        conv.padding = tuple(padding)
        self._hooks.append(conv.register_forward_pre_hook(lambda _, args: (self._with_halo_rows(args[0], pad),)))

    def _with_halo_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x (..., h, W) → (..., rows + h + rows, W): the neighbours' edge rows, zeros beyond the image."""
        band = self.band
        if band is None or band.size == 1:
            return F.pad(x, (0, 0, rows, rows))  # what the conv's own zero padding did
        if x.shape[-2] < rows:
            raise ValueError(f"a band of {x.shape[-2]} rows cannot supply {rows} halo rows; use fewer ranks")
        zeros = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
        above = below = zeros
        edges = torch.stack([x[..., :rows, :], x[..., -rows:, :]])  # (2, ..., rows, W): my top, my bottom
        parts = comm.all_gather_list(edges, band.group)
        if band.index > 0:
            above = parts[band.index - 1][1]  # the bottom rows of the band above
        if band.index < band.size - 1:
            below = parts[band.index + 1][0]  # the top rows of the band below
        return torch.cat([above, x, below], dim=-2)

    def remove(self):
        """Undo the wrapping: the VAE is again exactly the one that was loaded."""
        for hook in self._hooks:
            hook.remove()
        for conv, padding in self._paddings:
            conv.padding = padding
        for parent, attribute, norm in self._norms:
            setattr(parent, attribute, norm)
        self._hooks, self._paddings, self._norms = [], [], []
        if getattr(self.vae, "_k4flash_row_parallel", None) is self:
            del self.vae._k4flash_row_parallel

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, as_float: bool = False):
        """decode_latents over the ranks of the model group, each decoding a band of latent rows.

        Every rank of the group passes the same latents (F, h, w, 16) or (B, F, h, w, 16). Returns on the
        group's first rank the uint8 frames (B, T, 8h, 8w, 3) on CPU (or, `as_float`, the decoder's video
        (B, 3, T, 8h, 8w) before clamping); None on the others. Uses k ranks, the largest divisor of h
        that is at most the group size (a warning says so when k is smaller); the rest return None at once.
        """
        vae = self.vae
        if vae.use_tiling:
            raise ValueError("row-parallel VAE decode is exact only without tiling; call vae.disable_tiling()")
        z = scaled_latents(vae, latents)  # (B, 16, F, h, w) on every rank, bit-identical to the one-rank input
        height = z.shape[-2]
        size = ranks_for_height(height, self.size)
        if size < self.size and self.rank == 0 and height not in self._warned_heights:
            self._warned_heights.add(height)
            log.warning("VAE decode: latent height %d does not divide by the %d ranks of the model group; "
                        "decoding on %d rank(s), the largest divisor", height, self.size, size)
        if size not in self.groups:
            if self.make_group is None:
                raise ValueError(f"no process group of {size} ranks for a latent height of {height}")
            self.groups[size] = self.make_group(size)  # collective: before any rank returns below
        if self.index >= size:
            return None
        if size == 1:
            video = decode_scaled(vae, z)
            return video if as_float else to_uint8_frames(video).cpu()

        rows = height // size
        band_z = z[..., self.index * rows:(self.index + 1) * rows, :].contiguous()  # (B, 16, F, rows, w)
        self.band = _Band(self.groups[size], self.index, size)
        try:
            video = decode_scaled(vae, band_z)  # (B, 3, T, 8·rows, 8w)
        finally:
            self.band = None
        if as_float:
            parts = comm.gather_to_first(video, self.groups[size])
            return None if parts is None else torch.cat(parts, dim=-2)  # (B, 3, T, H, W)
        # Truncation to uint8 is per element, so converting before the gather is exact and sends 4× less.
        parts = comm.gather_to_first(to_uint8_frames(video), self.groups[size])
        return None if parts is None else torch.cat(parts, dim=2).cpu()  # (B, T, H, W, 3)


def band_sizes(group_size: int) -> set:
    """How many ranks decode, for every allowed geometry, other than 1 and the whole model group (which need
    no group of their own): e.g. {4, 6, 7} for a group of 8, none for 2 or 4."""
    heights = {height // VAE_SPATIAL_FACTOR for sizes in RESOLUTIONS.values() for height, _ in sizes}
    return {ranks_for_height(h, group_size) for h in heights} - {1, group_size}


def _prefix_groups(runtime, sizes) -> dict:
    """{k: process group of the first k ranks of this rank's model group} for each k in `sizes`.

    new_group is collective over the whole world, so every rank creates every model group's prefixes here,
    once, in the same order; at decode time each model group then uses only its own ranks (data-parallel
    groups decode at different times).
    """
    my_ranks = dist.get_process_group_ranks(runtime.group_mesh.get_group())
    size, world = runtime.group_size, dist.get_world_size()
    firsts = range(0, world, size)
    if my_ranks not in [list(range(first, first + size)) for first in firsts]:
        raise ValueError(f"row-parallel VAE decode expects model groups of consecutive ranks; this one is {my_ranks}")
    groups = {}
    for size in sorted(sizes):
        for first in firsts:
            group = dist.new_group(list(range(first, first + size)))
            if first == my_ranks[0]:
                groups[size] = group
    return groups


def parallelize_vae(vae, runtime) -> RowParallelVAE:
    """Wrap `vae` (an AutoencoderKLCogVideoX, same weights on every rank) for decode_latents_parallel.

    Collective: every rank of the job calls it, in the same order relative to other group creation. The
    smaller groups a geometry may need are communicators (GPU memory, start-up time), so none is made up
    front for one model group (it is made at its first use, when every rank of the job decodes together), and
    with several model groups only those the allowed geometries use.
    """
    if getattr(vae, "_k4flash_row_parallel", None) is not None:
        raise ValueError("this VAE is already parallelized")
    if runtime.group_size == 1:
        return RowParallelVAE(vae, {1: None}, 0, runtime.rank)
    groups = {runtime.group_size: runtime.group_mesh.get_group()}
    if runtime.dp_size == 1:
        return RowParallelVAE(vae, groups, runtime.group_rank, runtime.rank,
                              make_group=lambda size: dist.new_group(list(range(size))))
    groups.update(_prefix_groups(runtime, band_sizes(runtime.group_size)))
    return RowParallelVAE(vae, groups, runtime.group_rank, runtime.rank)


def decode_latents_parallel(vae, latents: torch.Tensor, as_float: bool = False):
    """RowParallelVAE.decode of a VAE that parallelize_vae wrapped (see there)."""
    wrapping = getattr(vae, "_k4flash_row_parallel", None)
    if wrapping is None:
        raise ValueError("decode_latents_parallel needs a VAE wrapped by parallel.vae.parallelize_vae")
    return wrapping.decode(latents, as_float=as_float)
