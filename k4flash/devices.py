"""Where each model runs and in which dtype: the device map, device names, and the "auto" dtype rule."""
import torch

DEVICE_KEYS = ("dit", "vae", "text_embedder")  # the official device_map's keys
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def normalize_device_map(device_map) -> dict:
    """One device for everything, or the official {dit, vae, text_embedder} dict → {key: torch.device}."""
    if isinstance(device_map, dict):
        unknown = set(device_map) - set(DEVICE_KEYS)
        missing = set(DEVICE_KEYS) - set(device_map)
        if unknown or missing:
            raise ValueError(f"device_map keys {sorted(device_map)} must be exactly {list(DEVICE_KEYS)}")
        return {key: check_available(torch.device(device_map[key])) for key in DEVICE_KEYS}
    return {key: check_available(torch.device(device_map)) for key in DEVICE_KEYS}


def check_available(device: torch.device) -> torch.device:
    """The device, once it is known to exist here: a CUDA device asked for on a machine without one (or past the
    last GPU) is refused at once, in one line, rather than by the first tensor moved there, after loading."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: CUDA is not available here (torch {torch.__version__}, "
                             "no GPU visible); use cpu (the CLI: device=cpu or device=auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")
    return device


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto → cuda:<local_rank> when CUDA is available, else cpu; a bare 'cuda' also means cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return check_available(device)


def resolve_dtype(name="auto", device="cpu") -> torch.dtype:
    """The compute dtype: a torch.dtype as given, or a name; "auto"/None = float32 on CPU, bfloat16 on an
    accelerator (as the official code runs; docs/model.md "Sampler")."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so stage timings measure the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
