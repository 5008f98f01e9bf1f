"""The embedded tiny model: an untrained, deterministic stand-in for the published weights.

`ensure_tiny_weights()` writes a folder laid out exactly like the real weights
(docs/model.md "Weights layout"), in the same file formats, so the very same loading and inference code
runs on it; only the sizes differ. The outputs are noise-like videos, not real content.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .sampler import DEFAULT_SCHEDULER_CONFIG
from .published import DIT_FILENAME
from .weights import REQUIRED_FILES, check_component

TINY_DIT_PARAMS = dict(
    in_visual_dim=16,
    in_text_dim=32,
    out_visual_dim=16,
    time_dim=32,
    patch_size=(1, 2, 2),
    model_dim=128,
    ff_dim=256,
    num_blocks=1,
    axes_dims=(4, 6, 6),  # head_dim 16 → 8 heads
)

# CogVideoX VAE with the real 8x spatial / 4x temporal compression (3 spatial up/down
# samplers, 2 of them temporal) and 16 latent channels, but only 8-16 channels wide.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 8, 16, 16),
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    scaling_factor=0.7,  # CogVideoX-5b's value
)

# T5 v1.1 style (gated-gelu, untied embeddings) encoder; d_model matches TINY_DIT_PARAMS["in_text_dim"].
TINY_T5_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)

TINY_FORMAT_VERSION = 1
_COMPLETE_MARKER = ".k4flash-tiny-complete"
_T5_EXTRA_IDS = 100  # T5's <extra_id_N> sentinels, appended after the sentencepiece pieces

# Fixed seeds, one per component, so each is reproducible on its own.
_DIT_SEED, _VAE_SEED, _T5_SEED = 0, 1, 2


def default_cache_dir() -> Path:
    """$K4FLASH_CACHE if set, else ~/.cache/k4flash."""
    env = os.environ.get("K4FLASH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "k4flash"


# ---------------------------------------------------------------------------- DiT


def tiny_dit_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of the tiny DiT (the published keys) with every tensor random and non-zero.

    The official init zeroes the modulation layers, which would make every block an identity
    and hide bugs; here every Linear/LayerNorm gets generator-drawn values instead.
    """
    from .dit import DiffusionTransformer3D

    with torch.random.fork_rng(devices=[]):  # the constructor's default init must not move the global RNG
        model = DiffusionTransformer3D(**TINY_DIT_PARAMS)
    # rope_embeddings.args_* are derived tables (docs/model.md "State-dict keys"), left as the model built them.
    fill_deterministic_(model, seed)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _is_norm(module: nn.Module) -> bool:
    # By name too: T5's T5LayerNorm (RMS norm, weight only) is not an nn.LayerNorm.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


@torch.no_grad()
def fill_deterministic_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with values drawn from torch.Generator(seed), in module order.

    Independent of library init schemes and of the global RNG, so the tensors are the same
    bytes on every run. Weights (Linear, Conv, ...) ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    biases 0.02·N, norm weights 1 + 0.1·N and norm biases 0.1·N: no tensor is zero.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if _is_norm(module):
                values = 1 + 0.1 * noise if name == "weight" else 0.1 * noise
            elif name == "bias":
                values = 0.02 * noise
            elif isinstance(module, nn.Embedding):
                values = noise
            elif parameter.ndim >= 2:
                fan_in = math.prod(parameter.shape[1:])  # (out, in, *kernel)
                values = noise / math.sqrt(fan_in)
            else:
                raise RuntimeError(f"fill_deterministic_ does not know how to fill {module_name}.{name} "
                                   f"({type(module).__name__}, shape {tuple(parameter.shape)})")
            parameter.copy_(values)
    return model


# ---------------------------------------------------------------------------- tokenizer

# A hand-written Unigram vocabulary (no trained pieces, so it is the same on every machine).
# Whole words carry the "▁" word-start prefix and score better than spelling them out;
# characters outside it become <unk>, as in the real T5 vocabulary.
_WORDS = """
a an the and or but of in on at to from with without by for over under into onto through
across along around between behind beside near above below up down out off away back
is are was were be been being has have had do does did will can could would should may
it its this that these those there here he she they we you i his her their our my your
one two three four five six seven eight nine ten many few some all every each no not
very more most less slowly quickly fast slow gently softly suddenly together
man woman men women person people child children boy girl baby family friend crowd
cat cats dog dogs horse horses bird birds fish panda bear lion tiger fox wolf deer rabbit
mouse elephant monkey cow sheep duck owl eagle butterfly bee dragon robot astronaut
car cars bus train plane boat ship bike bicycle road street city town village house
building tower bridge castle room kitchen window door table chair bed wall floor roof
forest tree trees flower flowers grass leaf leaves garden park field farm mountain
mountains hill valley river lake sea ocean beach wave waves shore island desert sand
snow ice rain storm cloud clouds sky sun moon star stars space planet earth fire smoke
water light lights shadow night day morning evening sunset sunrise winter summer spring
autumn red orange yellow green blue purple pink white black gray grey brown golden
silver dark bright colorful big small large little tall long short old young new
beautiful happy sad calm wild quiet loud warm cold hot soft hard wet dry deep high low
walk walks walking run runs running fly flies flying swim swims swimming jump jumps
dance dances dancing sit sits sitting stand stands standing look looks looking eat eats
eating drink play plays playing ride rides riding drive drives driving fall falls
falling move moves moving turn turns turning hold holds holding smile smiles smiling
camera shot view scene video film movie cinematic realistic detailed quality style
close closeup wide aerial slow motion zoom pan tracking focus background foreground
portrait landscape painting photo art animation cartoon anime render 3d 4k 8k hd
high resolution lighting neon glow glowing reflection mirror glass metal wood stone
paper gold steel fur hair eyes face hand hands head body dress shirt hat coat
""".split()

_SUFFIXES = "s es ed ing ly er est ion tion ness ful less able al y en".split()
_PUNCTUATION = list(".,!?;:'\"()[]{}-_/\\&%$#@*+=<>|~`^")
_CHARACTERS = (
    list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789") + _PUNCTUATION
)


def _tiny_sentencepiece_pieces() -> list[tuple[str, float, str]]:
    """(piece, log-prob score, type) in id order: <pad>=0, </s>=1, <unk>=2 as in T5."""
    pieces = [("<pad>", 0.0, "CONTROL"), ("</s>", 0.0, "CONTROL"), ("<unk>", 0.0, "UNKNOWN"), ("▁", -3.0, "NORMAL")]
    seen = {piece for piece, _, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score, "NORMAL"))

    # Scores only need the right order of magnitude: one word piece (≈ -5) must beat a
    # suffix split (≈ -5 + -8) which must beat spelling letter by letter (≈ -10 per char).
    for rank, word in enumerate(_WORDS):
        add("▁" + word, -5.0 - 0.001 * rank)
    for rank, word in enumerate(_WORDS):  # sentence-initial forms ("▁The"), as a real vocabulary has
        add("▁" + word.capitalize(), -5.5 - 0.001 * rank)
    for rank, suffix in enumerate(_SUFFIXES):
        add(suffix, -8.0 - 0.001 * rank)
    for rank, char in enumerate(_CHARACTERS):
        add("▁" + char, -9.0 - 0.001 * rank)
        add(char, -10.0 - 0.001 * rank)
    return pieces


def _nmt_nfkc_normalizer_spec():
    """The nmt_nfkc normalizer (what T5's spiece.model uses), as compiled by sentencepiece itself.

    The compiled character map is a fixed built-in table; training a throwaway model on one
    sentence is the only public way to get it, and its result is deterministic.
    """
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c"]), model_writer=buffer, vocab_size=8, model_type="char",
        normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2, hard_vocab_limit=False,
        bos_id=-1, eos_id=-1, pad_id=-1,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto.normalizer_spec


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a T5-style tokenizer folder (spiece.model + configs, like the real one); returns its length."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in _tiny_sentencepiece_pieces():
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Value(kind)
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Value("UNIGRAM")
    spec.vocab_size = len(proto.pieces)
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    spec.pad_piece, spec.eos_piece, spec.unk_piece = "<pad>", "</s>", "<unk>"
    spec.unk_surface = " \u2047 "  # sentencepiece's default rendering of <unk> when decoding
    proto.normalizer_spec.CopyFrom(_nmt_nfkc_normalizer_spec())

    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(proto.SerializeToString(deterministic=True))
    extra_ids = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    special_tokens = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "special_tokens_map.json", {**special_tokens, "additional_special_tokens": extra_ids})
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer",
        **special_tokens,
        "extra_ids": _T5_EXTRA_IDS,
        "additional_special_tokens": extra_ids,
        "model_max_length": 226,  # CogVideoX's value; k4flash always passes max_length=224 explicitly
        "legacy": True,
        "clean_up_tokenization_spaces": True,
    })
    return len(proto.pieces) + _T5_EXTRA_IDS


# ---------------------------------------------------------------------------- folder


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_progress_bars():
    """save_pretrained draws tqdm bars; a cache build should not spam every rank's log."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    diffusers_was_on = diffusers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers_logging.enable_progress_bar()
        if diffusers_was_on:
            diffusers_logging.enable_progress_bar()


def _build_tiny_weights(folder: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    folder.mkdir(parents=True)
    torch.save(tiny_dit_state_dict(seed=_DIT_SEED), folder / DIT_FILENAME)

    tokenizer_length = write_tiny_tokenizer(folder / "tokenizer")
    # Real T5 pads its embedding table to a multiple of 128 (32100 tokens → 32128 rows).
    vocab_size = math.ceil(tokenizer_length / 128) * 128

    with torch.random.fork_rng(devices=[]):  # default inits are overwritten; just leave the global RNG alone
        vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
        text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, **TINY_T5_CONFIG))
    with _quiet_progress_bars():
        fill_deterministic_(vae, _VAE_SEED)
        with torch.no_grad():
            # Random 1/fan_in weights leave the decoder output at std ≈ 1.2 (a third clipped);
            # scaling the last conv brings it to ≈ 0.4 so frames use the range without saturating.
            for parameter in vae.decoder.conv_out.parameters():
                parameter.mul_(0.35)
        vae.save_pretrained(folder / "vae")
        # is_main_process alone is not enough: under an initialised process group transformers
        # writes on rank 0 only, so build the cache before joining one (launch/cli.py does).
        fill_deterministic_(text_encoder, _T5_SEED).save_pretrained(folder / "text_encoder")

    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", DEFAULT_SCHEDULER_CONFIG)
    for kind in REQUIRED_FILES:  # a writer that silently skipped a file must not leave a "complete" cache
        check_component(kind, folder / kind)
    # Written last: its presence means every other file is complete.
    _write_json(folder / _COMPLETE_MARKER, {"format": "k4flash-tiny", "version": TINY_FORMAT_VERSION})


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def ensure_tiny_weights(root: str | Path | None = None) -> Path:
    """Return a folder holding the tiny weights (built on first use, then reused).

    root defaults to default_cache_dir()/"tiny-v1"; an existing empty folder is filled.
    Safe for concurrent callers: each builds in a private sibling folder and renames it
    into place, so nobody ever sees a half-written folder; a loser of the race uses the winner's.
    """
    root = Path(root).expanduser() if root is not None else default_cache_dir() / f"tiny-v{TINY_FORMAT_VERSION}"
    if _is_complete(root):
        return root
    # Re-check completeness last: another builder may have renamed its folder in meanwhile.
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not _is_complete(root):
        raise FileExistsError(f"{root} exists but is not a complete tiny-weights folder; remove it or pick another root")

    root.parent.mkdir(parents=True, exist_ok=True)
    building = root.parent / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_tiny_weights(building)
        try:
            # rename(2) is atomic and also replaces an *empty* directory (e.g. a fresh pytest tmp dir).
            os.rename(building, root)
        except OSError:
            if not _is_complete(root):  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root
