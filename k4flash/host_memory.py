"""Model weights in host memory: packed into one buffer, pinned at its exact size, and parked there for a while.

text_encoder.offload=cpu keeps T5 in such a buffer and streams it to the GPU a block at a time
(k4flash/text_encoder.py); dit.offload=during_decode parks the DiT in one while the VAE decodes
(`HostParking`, used by k4flash/pipeline.py).
"""
import weakref

import torch

# Each tensor's bytes start at a multiple of this in a packed host buffer: any dtype's alignment, and whole
# cache lines for the copy engines.
PACK_ALIGN = 64


def _layout(tensors) -> tuple:
    """([(start, nbytes)] per tensor, total bytes) of `tensors` packed one after another at PACK_ALIGN."""
    spans, total = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        spans.append((total, nbytes))
        total += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
    return spans, total


def _allocate(allocate, total: int) -> torch.Tensor:
    flat = allocate(total)
    if flat.dtype != torch.uint8 or flat.shape != (total,):
        raise ValueError(f"allocate({total}) must return a ({total},) uint8 tensor, "
                         f"got {flat.dtype} {tuple(flat.shape)}")
    return flat


def _views(flat, tensors, spans) -> list:
    """Each tensor's place in `flat`, in its dtype and shape."""
    return [flat[start:start + nbytes].view(t.dtype).view(t.shape) for t, (start, nbytes) in zip(tensors, spans)]


def pack_parameters(params, allocate) -> torch.Tensor:
    """Move the data of `params` into one flat byte buffer from `allocate(nbytes)`; each parameter becomes a view.

    allocate(nbytes) → a (nbytes,) uint8 tensor. Values, shapes and dtypes are unchanged; a parameter listed
    twice (tied weights) is packed once. Each parameter's old storage is freed as soon as it is copied, so
    the host holds the buffer plus what is not yet packed. Returns the buffer.
    """
    unique = list({id(p): p for p in params}.values())
    spans, total = _layout(unique)
    flat = _allocate(allocate, total)
    for p, view in zip(unique, _views(flat, unique, spans)):
        view.copy_(p.data)
        p.data = view
    return flat


def _unregister_host_memory(flat):
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


def pinned_host_bytes(nbytes: int, owner) -> torch.Tensor:
    """(nbytes,) uint8 of page-locked host memory, exactly nbytes of it, pinned for as long as `owner` lives.

    Not `pin_memory()` nor `torch.empty(pin_memory=True)`: both go through torch's caching host
    allocator, which rounds every block up to a power of two (T5-XXL's 8.9 GiB pinned tensor by
    tensor takes ~12.5 GiB; as one block it would take 16 GiB). A plain allocation registered with
    CUDA is pinned at its own size. When `owner` dies the memory is unregistered; the finalizer holds
    the buffer until then, so the registration always ends before the memory can be freed (views that
    outlive it see plain pageable memory).
    """
    flat = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(flat.data_ptr(), nbytes, 0)  # flags 0: cudaHostRegisterDefault
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {cudart.cudaGetErrorString(error)}")
        weakref.finalize(owner, _unregister_host_memory, flat)
    return flat


class HostParking:
    """A module's parameters and buffers parked in one host buffer, off their device, and brought back.

    `park()` copies every tensor into the buffer and points the module's tensors at their views of it,
    which frees their device memory; `unpark()` copies them into new tensors on that device again. Only
    the device changes: dtypes (float8 weights, float32 scales), shapes and bits stay, and the module
    objects stay, so whatever holds the module (hooks, compiled blocks, a TP plan's layers) still holds it.
    Tensors kept outside the parameters and buffers (e.g. the DiT's RoPE table cache, a few MB) stay put.

    The buffer is allocated at the first park and kept for the next ones: on a GPU it is pinned at its
    exact size (`pinned_host_bytes`: one registration, not one per park), so each park and unpark is one
    stream-ordered copy per tensor at full PCIe speed. `host_allocator` (nbytes → a (nbytes,) uint8
    tensor) replaces that allocator. On a CPU the same steps run with a plain buffer: parked tensors are
    views of it, unparked ones new copies (tests see every step; nothing is saved there).
    """

    def __init__(self, module: torch.nn.Module, host_allocator=None):
        self.module = module
        self.host_allocator = host_allocator
        self.buffer = None  # the packed host copy, once parked
        self.device = None  # where the tensors live when not parked
        self.parked = False

    def _tensors(self) -> list:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return list({id(t): t for t in tensors}.values())  # a tied tensor once

    def park(self) -> None:
        """Every tensor of the module into the host buffer; their device memory is freed. Idempotent."""
        if self.parked:
            return
        tensors = self._tensors()
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"the module's tensors are on {sorted(map(str, devices))}: one device is parked at a time")
        self.device = devices.pop()
        spans, total = _layout(tensors)
        if self.buffer is None:
            allocate = self.host_allocator or (
                (lambda n: pinned_host_bytes(n, owner=self)) if self.device.type == "cuda"
                else (lambda n: torch.empty(n, dtype=torch.uint8)))
            self.buffer = _allocate(allocate, total)
        elif self.buffer.numel() != total:
            raise RuntimeError(f"the module's tensors take {total} bytes, not the {self.buffer.numel()} bytes of "
                               "its first park")
        for t, view in zip(tensors, _views(self.buffer, tensors, spans)):
            view.copy_(t.data, non_blocking=True)  # stream-ordered: the freed block is reused only after it
            t.data = view
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host copy is complete before anything may overwrite it
        self.parked = True

    def unpark(self) -> None:
        """Every tensor back on its device, in new memory there; the host buffer stays for the next park."""
        if not self.parked:
            return
        for t in self._tensors():
            back = torch.empty_like(t.data, device=self.device)
            back.copy_(t.data, non_blocking=True)
            t.data = back
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.parked = False
