"""The files one generation writes for a `save_path`, named in one place (no torch: the app checks them before
anything loads).

`fox.mp4` stands for `fox.mp4` (or `fox.png` for an image: time_length 0), `fox.latents.safetensors`
when latents are asked for, and the sidecar `fox.json`, written in that order: the sidecar last, so its
presence marks a finished output.
"""
from pathlib import Path


def derived_path(path, suffix) -> Path:
    """`video.mp4` → `video<suffix>` (e.g. `.json`, `.latents.safetensors`)."""
    path = Path(path)
    return path.with_name(path.stem + suffix)


def media_path(save_path, time_length: int) -> Path:
    """The video, or for an image (time_length 0) the PNG beside where it would be."""
    return Path(save_path).with_suffix(".png") if time_length == 0 else Path(save_path)


def output_files(save_path, time_length: int, save_latents: bool = False) -> list:
    """Every file a generation writes for `save_path`, in write order (the sidecar last)."""
    media = media_path(save_path, time_length)
    latents = [derived_path(media, ".latents.safetensors")] if save_latents else []
    return [media, *latents, derived_path(media, ".json")]
