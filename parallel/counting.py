"""Counting what a forward does, by running it: FLOPs (torch.utils.flop_counter), the bytes memory-bound ops
read and write, the peak of live tensors, and the CogVideoX decode's counts on the meta device.

These are the measurements behind the cost model (parallel/cost.py): tests hold its formulas to
them, and parallel/rank_work.py counts one rank of a plan with them. Everything works on meta
tensors, so the published size costs no memory.
"""
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from k4flash.vae import decode_scaled

from .cost import PUBLISHED_LATENT

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    (m, k), n = a_shape, b_shape[1]
    return 2 * m * n * k


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU SDPA (torch registers formulas for the CUDA kernels only) and in-place
    addmm_."""
    mapping = {torch.ops.aten.addmm_: _addmm_inplace_flops}  # the Ulysses output projection accumulates with it
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn) -> dict:
    """Run fn() under the flop counter: {total, by_op}. Use real tensors or the meta device."""
    counter = flop_counter()
    with counter, torch.no_grad():
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return dict(total=counter.get_total_flops(), by_op=by_op)


class MemoryTraffic(TorchDispatchMode):
    """Bytes each non-view op reads and writes, at `bytes_per_element`, split into convolutions and the rest.

    An upper bound for an unfused implementation: every op's inputs come from HBM and its
    outputs go back. Works on meta tensors (only shapes are read).
    """

    def __init__(self, bytes_per_element=2):
        super().__init__()
        self.bytes_per_element = bytes_per_element
        self.conv_bytes = 0
        self.other_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() for t in tensors) * self.bytes_per_element
            if func.overloadpacket is torch.ops.aten.convolution:
                self.conv_bytes += moved
            else:
                self.other_bytes += moved
        return out


_MATMUL_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "convolution", "_scaled_mm"}
# Allocations, and _unsafe_view: the reshape that follows a copy (the copy is counted), an alias itself.
_NO_TRAFFIC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "zeros", "ones", "scalar_tensor",
                   "_unsafe_view"}


class RankWork(TorchDispatchMode):
    """One rank's memory-bound traffic: bytes each non-matmul, non-view op reads and writes.

    Matmuls and everything inside joint attention (the DiT's `attention`, wrapped with `uncounted`) are
    compute, counted as FLOPs instead; collectives are communication (c10d ops, and whatever a backend does inside
    one: wrap its calls with `uncounted`); allocations move nothing. Bytes are numel ×
    bytes_per_element whatever the dtype (a bf16 run's traffic from an fp32 one), except for what the functions in
    `exact` dispatch (called from them, at any depth below): each of their tensors counts at its own element
    size (an FP8 matmul's input quantization: float32 blocks, e4m3 out).
    """

    def __init__(self, bytes_per_element=2, exact=()):
        super().__init__()
        self.bytes_per_element = bytes_per_element
        self.bytes = 0
        self.skipping = False
        self._exact_code = frozenset(fn.__code__ for fn in exact)
        self.fp8_input_elements = 0  # what the FP8 matmuls took in (quantized tokens x features)

    def _in_exact(self) -> bool:
        frame = sys._getframe(2)  # the caller of __torch_dispatch__'s caller: the op's Python call site and up
        while frame is not None and self._exact_code:
            if frame.f_code in self._exact_code:
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "_scaled_mm" and not self.skipping:
            self.fp8_input_elements += args[0].numel()
        if func.is_view or self.skipping or func.namespace == "c10d" or name in _MATMUL_OPS \
                or name in _NO_TRAFFIC_OPS or "scaled_dot_product" in name:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if self._in_exact():
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        else:
            self.bytes += sum(t.numel() for t in tensors) * self.bytes_per_element
        return out

    def uncounted(self, fn):
        """fn, with nothing it dispatches counted (gloo copies buffers inside a collective; NCCL does not)."""
        def call(*args, **kwargs):
            skipping, self.skipping = self.skipping, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.skipping = skipping
        return call


class LivePeak(TorchDispatchMode):
    """The most bytes of tensors alive at once among those the ops under it create (meta tensors work).

    A storage counts from the op that makes it until the last tensor viewing it is freed; storages
    that existed before (weights, inputs) are not counted. No allocator rounding or caching: a floor
    for what a device allocator holds.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages = {}  # storage key → [bytes, tensors alive that view it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            entry = self._storages.get(key)
            if entry is None:
                if key in inputs:  # a view of, or an in-place op on, a tensor made outside
                    continue
                entry = self._storages[key] = [tensor.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key):
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def vae_decode_peak_bytes(latent_fhw=PUBLISHED_LATENT, bands=1, vae=None, dtype=torch.bfloat16) -> int:
    """Peak bytes of the decode's own tensors on one rank decoding a band of 1/bands of the latent rows.

    Runs diffusers' decoder on the meta device (published config unless `vae`), 2 latent frames per
    chunk as the pipeline. A band's halo rows (one or two per conv) are left out: a few rows of the
    band's 8·h/bands.
    """
    vae = (vae if vae is not None else published_vae()).to(dtype)
    f, h, w = latent_fhw
    z = torch.empty(1, vae.config.latent_channels, f, h // bands, w, device="meta", dtype=dtype)
    tracker = LivePeak()
    with tracker, torch.no_grad():
        decode_scaled(vae, z)
    return tracker.peak


def published_vae(device="meta"):
    """CogVideoX's AutoencoderKLCogVideoX at its published size (the class defaults are that config)."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device(device):
        return AutoencoderKLCogVideoX().eval()


def vae_decode_counts(latent_fhw=PUBLISHED_LATENT, vae=None, frames_per_chunk=2) -> dict:
    """Convolution FLOPs and memory traffic of one decode (2 latent frames per chunk, as the pipeline)."""
    vae = vae if vae is not None else published_vae()
    device = next(vae.parameters()).device
    z = torch.empty(1, vae.config.latent_channels, *latent_fhw, device=device)
    vae.num_latent_frames_batch_size = frames_per_chunk
    traffic = MemoryTraffic()
    counter = flop_counter()
    # The calls a row-parallel decode (parallel/vae.py) turns into collectives: one halo exchange
    # per conv with a kernel taller than 1 row, one all-reduce per GroupNorm.
    row_mixing_calls = [0]

    def count_call(module, args):
        row_mixing_calls[0] += 1

    hooks = [m.register_forward_pre_hook(count_call) for m in vae.decoder.modules()
             if isinstance(m, torch.nn.GroupNorm)
             or (isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[m.weight.ndim - 4] > 1)]
    try:
        with counter, traffic, torch.no_grad():
            frames = vae.decode(z).sample
    finally:
        for hook in hooks:
            hook.remove()
    return dict(conv_flops=counter.get_total_flops(), conv_bytes=traffic.conv_bytes,
                elementwise_bytes=traffic.other_bytes, frames=tuple(frames.shape),
                row_parallel_collectives=row_mixing_calls[0])
