"""Finding, validating and loading the published weights (docs/model.md "Weights layout").

One load path for the DiT (after gpt-fast's `_load_model`): build on the meta
device → read the checkpoint (mmap) → check every key and shape → assign → recompute
derived buffers → move → eval. The checkpoint is checked against the model before a
byte of it is materialised, so a wrong file fails with the offending key.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .dit import DiffusionTransformer3D
from .published import COMPONENTS_REPO, DIT_FILENAME, DIT_REPO

# Buffers derived from the config: a file may or may not carry them (docs/model.md "State-dict keys"),
# we recompute.
DERIVED_KEYS = ("rope_embeddings.args_0", "rope_embeddings.args_1", "rope_embeddings.args_2")


class CheckpointError(ValueError):
    """A DiT checkpoint that does not fit the model (missing/extra/misshaped key, unreadable file)."""


# What makes a component folder loadable: every group must have at least one file present.
REQUIRED_FILES = {
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.safetensors.index.json")),
    "text_encoder": (("config.json",), ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                        "pytorch_model.bin.index.json")),
    "tokenizer": (("spiece.model", "tokenizer.json"),),
    "scheduler": (("scheduler_config.json",),),
}


def check_component(kind: str, path: Path) -> None:
    """Raise FileNotFoundError when a weights folder lacks a file its loader needs (before loading anything)."""
    path = Path(path)
    if kind == "dit":
        if not path.is_file():
            raise FileNotFoundError(f"dit weights at {path} are not a file")
        return
    if kind == "scheduler" and path.is_file():  # a scheduler_config.json given directly
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} weights at {path} are not a folder")
    for alternatives in REQUIRED_FILES[kind]:
        if not any((path / name).is_file() for name in alternatives):
            raise FileNotFoundError(f"{kind} weights at {path} are incomplete: none of {', '.join(alternatives)} "
                                    f"is there")


@dataclass
class WeightPaths:
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    scheduler: Path


def _download(kind, repo, filename=None, subfolder=None, local_dir=None):
    """Fetch one missing component from the Hugging Face Hub; None when offline or unreachable."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        if filename is not None:
            return Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=local_dir))
        snapshot_download(repo_id=repo, allow_patterns=f"{subfolder}/*", local_dir=local_dir)
        return Path(local_dir) / subfolder
    except Exception:  # offline, no network, no such repo: the caller reports what is missing
        return None


def resolve_weight_paths(cache_dir="./weights/", dit_path=None, text_encoder_path=None, tokenizer_path=None,
                         vae_path=None, scheduler_path=None, download=True) -> WeightPaths:
    """Explicit paths win; else the published layout under cache_dir; else the Hub (when online)."""
    cache_dir = Path(cache_dir)
    wanted = {
        "dit": (dit_path, cache_dir / DIT_FILENAME, DIT_REPO, DIT_FILENAME, None),
        "vae": (vae_path, cache_dir / "vae", COMPONENTS_REPO, None, "vae"),
        "text_encoder": (text_encoder_path, cache_dir / "text_encoder", COMPONENTS_REPO, None, "text_encoder"),
        "tokenizer": (tokenizer_path, cache_dir / "tokenizer", COMPONENTS_REPO, None, "tokenizer"),
        "scheduler": (scheduler_path, cache_dir / "scheduler", COMPONENTS_REPO, None, "scheduler"),
    }
    resolved = {}
    for kind, (explicit, default, repo, filename, subfolder) in wanted.items():
        path = Path(explicit) if explicit is not None else default
        if not path.exists() and explicit is None and download and not os.environ.get("HF_HUB_OFFLINE"):
            path = _download(kind, repo, filename, subfolder, str(cache_dir)) or path
        if not path.exists():
            source = f"{repo}/{filename or subfolder}"
            raise FileNotFoundError(f"{kind} weights not found at {path}; put {source} (Hugging Face) there "
                                    f"or pass its path explicitly")
        check_component(kind, path)
        resolved[kind] = path
    return WeightPaths(**resolved)


def read_checkpoint(path) -> dict:
    """A DiT state dict from .safetensors or a torch .pt (weights_only, memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zipfile format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read DiT checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"DiT checkpoint {path} is not a flat state dict of tensors")
    return state


def check_state_dict(state: dict, expected: dict, source="checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshaped key.

    `expected` maps key → shape-bearing tensor (meta tensors are fine). Derived RoPE
    buffers may be absent; when present they must have the expected shape.
    """
    missing = sorted(k for k in expected if k not in state and k not in DERIVED_KEYS)
    if missing:
        raise CheckpointError(f"{source} is missing {len(missing)} key(s), first: {missing[0]!r}")
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} unexpected key(s), first: {unexpected[0]!r}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")


def safetensors_sibling(checkpoint_path) -> Path:
    """`x.pt` → `x.safetensors` (`python -m parallel.convert x.pt` writes it)."""
    path = Path(checkpoint_path)
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def preferred_checkpoint(checkpoint_path) -> Path:
    """The safetensors copy when there is one (no unpickling at all, and sliceable), else the file itself."""
    sibling = safetensors_sibling(checkpoint_path)
    return sibling if sibling.is_file() else Path(checkpoint_path)


def load_dit(params: dict, checkpoint_path, device="cpu", dtype=torch.float32) -> DiffusionTransformer3D:
    """Build the DiT on the meta device, load the checkpoint strictly, move, eval."""
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    checkpoint_path = preferred_checkpoint(checkpoint_path)
    state = read_checkpoint(checkpoint_path)
    check_state_dict(state, model.state_dict(), source=f"DiT checkpoint {checkpoint_path}")
    state = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    model.load_state_dict(state, strict=False, assign=True)
    model.init_derived_buffers()  # the RoPE buffers are still meta
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
