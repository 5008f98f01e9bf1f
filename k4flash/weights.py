"""Finding, validating and loading the published weights (docs/model.md "Weights layout").

One load path for the DiT (after gpt-fast's `_load_model`): check the file itself (truncated, corrupt:
checkpoint_check.py) → build on the meta device → read the checkpoint (mmap) → check every key and shape →
assign → recompute derived buffers → move → eval. The checkpoint is checked against the model before a
byte of it is materialised, so a wrong file fails with the offending key.
"""
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fp8
from .checkpoint_check import CheckpointError, check_checkpoint_file, check_dit_checkpoint
from .dit import DiffusionTransformer3D
from .published import COMPONENTS_REPO, DIT_FILENAME, DIT_REPO, PUBLISHED_DIT_PARAMS

log = logging.getLogger("k4flash")
# Buffers derived from the config: a file may or may not carry them (docs/model.md "State-dict keys"),
# we recompute.
DERIVED_KEYS = ("rope_embeddings.args_0", "rope_embeddings.args_1", "rope_embeddings.args_2")


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


# The reachability probe: one HEAD for the DiT file's metadata, no retries, nothing written to disk.
HUB_PROBE_TIMEOUT = 5.0  # seconds
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's own reading of HF_HUB_OFFLINE
_PYTHON_ARGS = {"dit": "dit_path", "vae": "vae_path", "text_encoder": "text_encoder_path",
                "tokenizer": "tokenizer_path", "scheduler": "scheduler_path"}


def _one_line(err: BaseException, limit=160) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _offline_reason():
    """Why the Hub must not be contacted per the environment, or None (read at call time, not import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var} is set (offline)"
    return None


@contextlib.contextmanager
def _quiet_hub():
    """Silence huggingface_hub's warnings (retry / HTTP-error lines) for the duration."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _probe_hub(timeout=HUB_PROBE_TIMEOUT):
    """None when the Hub answers a HEAD for the DiT file within `timeout`, else why not.

    One request on huggingface_hub's own session (its proxy, endpoint and offline settings), no
    retries, no warnings, nothing written to disk. Deliberately not get_hf_file_metadata: its
    headers make huggingface_hub >= 1.x first fetch an agent registry (another 3 s timeout when
    the network is down, and a file under HF_HOME when it is up). Any HTTP answer below 500
    (200, 302, 401, 404) counts as reachable: the download then reports its own error.
    """
    try:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import get_session
    except ImportError as err:
        return f"huggingface_hub is unavailable ({_one_line(err)})"
    if getattr(constants, "HF_HUB_OFFLINE", False):  # set in the environment when huggingface_hub was imported
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    url = hf_hub_url(DIT_REPO, DIT_FILENAME)
    try:
        with _quiet_hub():
            session = get_session()
            try:
                response = session.head(url, timeout=timeout, follow_redirects=False)  # httpx (hub >= 1.0)
            except TypeError:
                response = session.head(url, timeout=timeout)  # requests (hub < 1.0) never follows a HEAD
    except Exception as err:  # DNS, refused, timeout, proxy, TLS, offline mode
        return f"the Hub is unreachable ({_one_line(err)})"
    if response.status_code >= 500:
        return f"the Hub is unreachable (HTTP {response.status_code} for {url})"
    return None


def _download(kinds, cache_dir: Path):
    """Fetch the missing `kinds` into the published layout under cache_dir; why any failed, or None.

    Called only after the probe succeeded: this is the first thing that writes to disk.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    cache_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    if "dit" in kinds:
        try:
            hf_hub_download(repo_id=DIT_REPO, filename=DIT_FILENAME, local_dir=str(cache_dir))
        except Exception as err:  # the caller reports what is still missing
            failures.append(_one_line(err))
    subfolders = [kind for kind in kinds if kind != "dit"]
    if subfolders:
        try:
            snapshot_download(repo_id=COMPONENTS_REPO, allow_patterns=[f"{sub}/*" for sub in subfolders],
                              local_dir=str(cache_dir))
        except Exception as err:
            failures.append(_one_line(err))
    return f"the download failed ({'; '.join(failures)})" if failures else None


def _missing_message(missing, cache_dir: Path, reason) -> str:
    """One line naming every missing component, where it was looked for, and what to do about it."""
    (kind, path, _), others = missing[0], missing[1:]
    text = f"{kind} weights not found at {path}"
    if others:
        in_cache = [k for k, _, explicit in others if not explicit]
        elsewhere = [f"{k} at {p}" for k, p, explicit in others if explicit]
        also = ([f"{', '.join(in_cache)} in {cache_dir}"] if in_cache else []) + elsewhere
        text += f" (also missing: {', '.join(also)})"
    kinds = [k for k, _, _ in missing]
    sources = [f"{DIT_REPO}/{DIT_FILENAME}"] if "dit" in kinds else []
    subfolders = [k for k in kinds if k != "dit"]
    if len(subfolders) == 1:
        sources.append(f"{COMPONENTS_REPO}/{subfolders[0]}")
    elif subfolders:
        sources.append(f"{COMPONENTS_REPO}/{{{','.join(subfolders)}}}")
    python_args = (f"{_PYTHON_ARGS[kinds[0]]}=" if len(kinds) == 1 else
                   ", ".join(f"{_PYTHON_ARGS[k]}=" for k in kinds) if len(kinds) == 2 else "the *_path= arguments")
    text += (f"; put {' and '.join(sources)} (Hugging Face) there, or point weights_dir= (CLI) / cache_dir= or "
             f"{python_args} (Python) at {'it' if len(kinds) == 1 else 'them'}")
    return f"{text}; {reason}" if reason else text


def resolve_weight_paths(cache_dir="./weights/", dit_path=None, text_encoder_path=None, tokenizer_path=None,
                         vae_path=None, scheduler_path=None, download=True) -> WeightPaths:
    """Explicit paths win; else the published layout under cache_dir; else the Hub (when online).

    Nothing is written before a download really starts: the missing components are worked out
    first, then (download allowed, HF_HUB_OFFLINE unset) one short, quiet probe of the Hub; when
    it fails, FileNotFoundError names every missing component at once. Explicit paths are never
    downloaded.
    """
    cache_dir = Path(cache_dir)
    wanted = {
        "dit": (dit_path, cache_dir / DIT_FILENAME),
        "vae": (vae_path, cache_dir / "vae"),
        "text_encoder": (text_encoder_path, cache_dir / "text_encoder"),
        "tokenizer": (tokenizer_path, cache_dir / "tokenizer"),
        "scheduler": (scheduler_path, cache_dir / "scheduler"),
    }
    paths = {kind: (Path(explicit) if explicit is not None else default, explicit is not None)
             for kind, (explicit, default) in wanted.items()}
    for kind, (path, _) in paths.items():  # what is there must be usable: local checks before any network
        if path.exists():
            check_component(kind, path)
    missing = [(kind, path, explicit) for kind, (path, explicit) in paths.items() if not path.exists()]
    if missing:
        fetchable = [kind for kind, _, explicit in missing if not explicit]
        reason = None
        if fetchable:
            reason = _offline_reason() or ("downloads are disabled" if not download else _probe_hub())
            if reason is None:
                reason = _download(fetchable, cache_dir) or "still missing after the download"
        missing = [(kind, path, explicit) for kind, path, explicit in missing if not path.exists()]
        if missing:
            raise FileNotFoundError(_missing_message(missing, cache_dir, reason))
        for kind, (path, _) in paths.items():
            check_component(kind, path)
    return WeightPaths(**{kind: path for kind, (path, _) in paths.items()})


def read_checkpoint(path) -> dict:
    """A DiT state dict from a torch .pt (weights_only, memory-mapped: tensors are read when touched),
    or from .safetensors (each tensor read in full; prefer open_checkpoint, which reads per tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        source = SafetensorsCheckpoint(path)
        return {key: source.reader(key)(None, None) for key in source.shapes}
    check_checkpoint_file(path)  # its zip records, before unpickling anything
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-zipfile format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read DiT checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"DiT checkpoint {path} is not a flat state dict of tensors")
    return state


def slice_reader(tensor):
    """A `read(rows, cols)` over an in-memory (or memory-mapped) tensor: views, so only the block is touched.

    rows / cols: (start, stop) or None for all; the sharded loader (parallel/load.py) reads this way.
    """
    def read(rows, cols):
        view = tensor if rows is None else tensor[rows[0]:rows[1]]
        return view if cols is None else view[:, cols[0]:cols[1]]
    return read


class SafetensorsCheckpoint:
    """A .safetensors DiT read one tensor (or one block of it) at a time; the rest of the file stays on disk.

    The file is reopened per read so that no mapping outlives it.
    """

    def __init__(self, path):
        from safetensors import safe_open

        self.path, self._open = str(path), safe_open
        check_checkpoint_file(path)  # the header and every tensor's offsets against the file's size
        try:
            with safe_open(self.path, framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                self.shapes = {k: tuple(piece.get_shape()) for k, piece in slices.items()}
                self.quantized = {k for k, piece in slices.items() if piece.get_dtype() == "F8_E4M3"}  # FP8 keys
        except Exception as err:
            raise CheckpointError(f"cannot read DiT checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) \
                from err

    def reader(self, key):
        def read(rows, cols):
            with self._open(self.path, framework="pt") as f:
                piece = f.get_slice(key)
                if rows is None and cols is None:
                    return piece[:]
                if cols is None:
                    return piece[rows[0]:rows[1]]
                return piece[:, cols[0]:cols[1]] if rows is None else piece[rows[0]:rows[1], cols[0]:cols[1]]
        return read


class TorchCheckpoint:
    """A memory-mapped .pt (weights_only): slicing touches only the pages it reads."""

    def __init__(self, path):
        self.state = read_checkpoint(path)
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        self.quantized = {k for k, v in self.state.items() if v.dtype == fp8.FP8}

    def reader(self, key):
        return slice_reader(self.state[key])


def open_checkpoint(checkpoint_path, model=None):
    """(checkpoint, path): the .safetensors sibling when there is one (no unpickling, per-tensor reads), else
    the file itself; `checkpoint.shapes` is every key's shape, `checkpoint.reader(key)(rows, cols)` a block.
    For an FP8 `model`, first its FP8 conversion `<stem>.fp8.safetensors` when that suits the model's fp8_skip."""
    fp8_path = fp8.fp8_sibling(checkpoint_path)
    if model is not None and fp8.is_quantized(model) and fp8_path.is_file():
        checkpoint = SafetensorsCheckpoint(fp8_path)
        if fp8.checkpoint_expectation(model.state_dict(), checkpoint.shapes, checkpoint.quantized)[1] is None:
            return checkpoint, fp8_path
        log.info("%s quantizes blocks that dit.fp8_skip keeps in bf16; quantizing %s while loading instead",
                 fp8_path, checkpoint_path)
    path = preferred_checkpoint(checkpoint_path)
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path), path
    log.info("reading %s through mmap; `python -m parallel.convert %s` makes a safetensors copy that loads "
             "per tensor", checkpoint_path, checkpoint_path)
    return TorchCheckpoint(path), path


def check_checkpoint(checkpoint, path, model) -> None:
    """check_state_dict on the checkpoint's shapes alone (nothing is read), for a bf16 or an FP8 model
    (k4flash/fp8.py: an FP8 model takes either kind of file, a bf16 one only a bf16 file)."""
    expected, problem = fp8.checkpoint_expectation(model.state_dict(), checkpoint.shapes, checkpoint.quantized)
    if problem:
        raise CheckpointError(f"DiT checkpoint {path} {problem}")
    check_state_dict({k: torch.empty(s, device="meta") for k, s in checkpoint.shapes.items()}, expected,
                     source=f"DiT checkpoint {path}")


def dit_size(state: dict):
    """(block pairs, width) of a DiT state dict (tensors or shapes' carriers), or None when it is not one."""
    text_in = state.get("text_embeddings.in_layer.weight")
    # A pair counts when its last layer is there (a stray key alone is an unexpected key, not a size).
    pairs = sum(1 for key in state
                if key.startswith("transformer_blocks.") and key.endswith(".1.feed_forward.out_layer.weight"))
    if text_in is None or not pairs:
        return None
    return pairs, int(text_in.shape[0])


_PUBLISHED_SIZE = (PUBLISHED_DIT_PARAMS["num_blocks"], PUBLISHED_DIT_PARAMS["model_dim"])


def _describe(size) -> str:
    pairs, width = size
    return f"{pairs} block pair{'s' if pairs != 1 else ''} of width {width}"


def check_state_dict(state: dict, expected: dict, source="checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshaped key.

    `expected` maps key → shape-bearing tensor (meta tensors are fine). Derived RoPE
    buffers may be absent; when present they must have the expected shape.
    """
    size, model_size = dit_size(state), dit_size(expected)
    if size and model_size and size != model_size:
        raise CheckpointError(
            f"{source} is another size: it has {_describe(size)}, the model built has {_describe(model_size)}"
            f"{' (the published DiT)' if model_size == _PUBLISHED_SIZE else ''}; pass its dit_params= (Python) "
            f"or choose its model= (CLI)")
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


def owned_copy(tensor, device, dtype) -> torch.Tensor:
    """`tensor` on `device` in `dtype`, contiguous, in memory of its own: never a view into the checkpoint file
    (a same-device, same-dtype `.to` would return the memory-mapped tensor itself, leaving the weights as
    file pages that the kernel may drop and re-read, and the mapping open)."""
    out = tensor.to(device=device, dtype=dtype).contiguous()
    # safetensors slices are views (`_base`) of the mapped tensor; a memory-mapped .pt's storage has a file name.
    from_file = tensor._base is not None or getattr(tensor.untyped_storage(), "filename", None) is not None
    return out.clone() if from_file and out.data_ptr() == tensor.data_ptr() else out


def load_dit(params: dict, checkpoint_path, device="cpu", dtype=torch.float32, *, quantize="none",
             fp8_skip=()) -> DiffusionTransformer3D:
    """Build on meta (quantize="fp8": the big linears FP8 but for fp8_skip's blocks), check the file's keys and
    shapes, read it a tensor at a time onto `device` in `dtype` (FP8 weights as stored, or quantized here), eval."""
    fp8.validate_quantize(quantize, fp8_skip, params["num_blocks"])
    check_dit_checkpoint(checkpoint_path, quantize)  # a truncated or corrupt file: before the model is built
    with torch.device("meta"):
        model = DiffusionTransformer3D(**params)
    if quantize == "fp8":
        fp8.quantize_dit(model, fp8_skip)
    checkpoint, path = open_checkpoint(checkpoint_path, model)
    check_checkpoint(checkpoint, path, model)
    readers = fp8.tensor_readers(checkpoint, model)
    state = {name: owned_copy(readers[name](None, None), device, fp8.load_dtype(name, param.dtype, dtype))
             for name, param in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    del state  # the cast below makes new FP8 tensors (fp8.py): no second reference may keep the old ones alive
    model.init_derived_buffers()  # the RoPE buffers are still meta
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # FP8 layers keep theirs (fp8.py)
