"""T5 text conditioning exactly as the official code does it (docs/model.md "Text conditioning").

Prompts are tokenised to a fixed 224 tokens (EOS added, right-padded with <pad>, longer
prompts truncated) and the encoder is run WITHOUT an attention mask, so padding positions
attend and are attended to; all 224 hidden states (padding included) condition the DiT.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5EncoderModel

from .geometry import validate_offload
from .host_memory import pack_parameters, pinned_host_bytes
from .published import TEXT_TOKENS


class BlockStreamer:
    """Run a host-resident T5 encoder on a GPU, a block at a time (text_encoder.offload=cpu).

    The weights stay in pinned host memory. Inside `with streamer:`, a forward pre-hook on each
    stage (the token embedding, each block, the final norm) makes sure that stage's weights are on
    the device, starting the next stage's copy on a side stream so it overlaps this stage's compute;
    a forward hook puts the host tensors back, so at most two stages' weights are on the device.
    `device` may be any device (a CPU copy exercises the same path in tests).

    On a GPU the weights are first packed into one host buffer pinned at its exact size
    (`pack_parameters` into `pinned_host_bytes`), each parameter a view of it; `host_allocator`
    (nbytes → a (nbytes,) uint8 tensor) replaces that buffer's allocator, and given on any device
    packs there too (tests).
    """

    def __init__(self, encoder, device, host_allocator=None):
        self.device = torch.device(device)
        self.stages = [encoder.encoder.embed_tokens, *encoder.encoder.block, encoder.encoder.final_layer_norm]
        if host_allocator is None and self.device.type == "cuda":
            host_allocator = functools.partial(pinned_host_bytes, owner=self)
        self.host_buffer = None
        if host_allocator is not None:
            self.host_buffer = pack_parameters([p for stage in self.stages for p in stage.parameters(recurse=True)],
                                               host_allocator)
        self.host = [[p.data for p in stage.parameters(recurse=True)] for stage in self.stages]
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.on_device = {}  # stage index → its device tensors (copies issued)
        self.hooks = []

    def _fetch(self, index):
        if index >= len(self.stages) or index in self.on_device:
            return
        stream = torch.cuda.stream(self.copy_stream) if self.copy_stream else contextlib.nullcontext()
        with stream:
            self.on_device[index] = [t.to(self.device, non_blocking=True) for t in self.host[index]]

    def _before(self, index):
        def hook(module, args):
            self._fetch(index)
            if self.copy_stream:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            for p, t in zip(module.parameters(recurse=True), self.on_device[index]):
                p.data = t
            self._fetch(index + 1)  # overlaps this stage's compute
        return hook

    def _after(self, index):
        def hook(module, args, output):
            for p, t in zip(module.parameters(recurse=True), self.host[index]):
                p.data = t
            released = self.on_device.pop(index)
            if self.copy_stream:
                for t in released:  # the copy stream may reuse this memory only after the compute is done
                    t.record_stream(torch.cuda.current_stream(self.device))
        return hook

    def __enter__(self):
        for i, stage in enumerate(self.stages):
            self.hooks += [stage.register_forward_pre_hook(self._before(i)),
                           stage.register_forward_hook(self._after(i))]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for index in list(self.on_device):
            self.on_device.pop(index)


def _check_options(max_length, dtype) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be a positive int")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} must be a torch.dtype such as torch.float32 or torch.bfloat16")


class T5TextEncoder:
    """T5 encoder + tokenizer; calling it maps prompts to (B, max_length, d_model) embeddings.

    offload (k4flash/geometry.py TEXT_ENCODER_OFFLOADS): "none" keeps the encoder on `device`;
    "after_encode" too, and `release()` frees it once the prompts are encoded; "cpu" keeps its
    weights in host memory (pinned when `device` is a GPU) and, on a GPU, streams them to `device`
    one block at a time while the next block's copy is under way (`BlockStreamer`); on a CPU it
    encodes where the weights are.
    """

    def __init__(
        self,
        encoder_path: str | Path,
        tokenizer_path: str | Path,
        max_length: int = TEXT_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: str = "none",
    ):
        _check_options(max_length, dtype)
        # Never trust_remote_code: a weights folder must not be able to run code.
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        encoder = T5EncoderModel.from_pretrained(str(encoder_path), dtype=dtype, trust_remote_code=False)
        self._place(encoder, tokenizer, max_length, device, dtype, offload)

    @classmethod
    def from_modules(cls, encoder, tokenizer, max_length: int = TEXT_TOKENS, device="cpu", dtype=torch.float32,
                     offload: str = "none") -> "T5TextEncoder":
        """An encoder from a T5EncoderModel and tokenizer already built (in `dtype`), placed as `offload` says:
        for benchmarks that run the published shape with random weights, which no checkpoint holds."""
        _check_options(max_length, dtype)
        text_encoder = cls.__new__(cls)
        text_encoder._place(encoder, tokenizer, max_length, device, dtype, offload)
        return text_encoder

    def _place(self, encoder, tokenizer, max_length, device, dtype, offload) -> None:
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = validate_offload(offload)
        self.tokenizer = tokenizer
        self.config = encoder.config
        self.streamer = None
        if offload == "cpu":
            self.encoder = encoder.eval().requires_grad_(False)  # stays in host memory
            if self.device.type != "cpu":
                self.streamer = BlockStreamer(self.encoder, self.device)
        else:
            self.encoder = encoder.to(self.device).eval().requires_grad_(False)

    @property
    def d_model(self) -> int:
        """Width of the embeddings (4096 for T5-v1.1-XXL)."""
        return self.config.d_model

    @property
    def released(self) -> bool:
        return self.encoder is None

    def release(self) -> None:
        """Free the encoder's weights (text_encoder.offload=after_encode); the tokenizer stays for counting."""
        self.encoder = self.streamer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length): EOS appended, right-padded with <pad>, truncated to max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r:.200}")
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens["input_ids"]  # (B, max_length)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Embed prompts (a str counts as one prompt) → (B, max_length, d_model) in self.dtype on self.device."""
        if self.encoder is None:
            raise RuntimeError("the text encoder was released after encoding (text_encoder.offload=after_encode); "
                               "pass the prompt's text_embed, or load with offload none or cpu")
        input_ids = self.tokenize(prompts).to(self.device if self.offload != "cpu" or self.streamer else "cpu")
        # No attention_mask on purpose: the official model was trained/distilled with the
        # encoder seeing the padding, so masking it would change every embedding.
        with self.streamer if self.streamer is not None else contextlib.nullcontext():
            hidden = self.encoder(input_ids=input_ids).last_hidden_state  # (B, max_length, d_model)
        return hidden.to(device=self.device, dtype=self.dtype)

    def token_count(self, prompt: str) -> int:
        """Number of tokens in `prompt` before truncation, EOS included (> max_length means it gets cut)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        # verbose=False: counting a long prompt is expected here, not worth the tokenizer's length warning.
        ids = self.tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids)
