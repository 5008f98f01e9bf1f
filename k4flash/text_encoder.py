"""T5 text conditioning exactly as the official code does it (docs/model.md "Text conditioning").

Prompts are tokenised to a fixed 224 tokens (EOS added, right-padded with <pad>, longer
prompts truncated) and the encoder is run WITHOUT an attention mask, so padding positions
attend and are attended to; all 224 hidden states (padding included) condition the DiT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, T5EncoderModel

from .published import TEXT_TOKENS


class T5TextEncoder:
    """T5 encoder + tokenizer; calling it maps prompts to (B, max_length, d_model) embeddings."""

    def __init__(
        self,
        encoder_path: str | Path,
        tokenizer_path: str | Path,
        max_length: int = TEXT_TOKENS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive int")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype={dtype!r} must be a torch.dtype such as torch.float32 or torch.bfloat16")
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        # Never trust_remote_code: a weights folder must not be able to run code.
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        encoder = T5EncoderModel.from_pretrained(str(encoder_path), dtype=dtype, trust_remote_code=False)
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)

    @property
    def d_model(self) -> int:
        """Width of the embeddings (4096 for T5-v1.1-XXL)."""
        return self.encoder.config.d_model

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
        input_ids = self.tokenize(prompts).to(self.device)
        # No attention_mask on purpose: the official model was trained/distilled with the
        # encoder seeing the padding, so masking it would change every embedding.
        hidden = self.encoder(input_ids=input_ids).last_hidden_state  # (B, max_length, d_model)
        return hidden.to(self.dtype)

    def token_count(self, prompt: str) -> int:
        """Number of tokens in `prompt` before truncation, EOS included (> max_length means it gets cut)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        # verbose=False: counting a long prompt is expected here, not worth the tokenizer's length warning.
        ids = self.tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids)
