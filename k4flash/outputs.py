"""Writing results to disk: MP4 videos, JSON records and safetensors files.

Every writer is atomic: it writes a dot-prefixed temporary file in the target's
directory and `os.replace`s it onto the target, so a reader (or a crashed run)
never sees a half-written file, and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from .ffmpeg import MissingEncoder, has_imageio_ffmpeg, imageio_ffmpeg, mp4_encoder_problem, write_with_path_ffmpeg


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# Files are published with the mode a plain open() would give (0o666 less the umask), whatever
# the writer used for its temporary file (safetensors writes 0600).
FILE_MODE = 0o666 & ~_umask()


def _as_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Validate (T, H, W, 3) uint8 frames and return them as a C-contiguous numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T >= 1, got {tuple(frames.shape)}")
    return np.ascontiguousarray(frames)


IN_FLIGHT = set()  # temporary files being written now


def discard_in_flight() -> None:
    """Remove every temporary file still being written: for a process about to end without unwinding
    (parallel/health.py's exit from a rank whose main thread is stuck), which runs no `finally`."""
    for temp_path in list(IN_FLIGHT):
        with contextlib.suppress(OSError):
            temp_path.unlink()


@contextlib.contextmanager
def _atomic_target(path: str | Path, overwrite: bool, suffix: str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The temporary name keeps `suffix` because ffmpeg picks the container from the extension.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random part: several ranks/threads may write next to each other at once.
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    IN_FLIGHT.add(temp_path)
    try:
        yield temp_path
        os.chmod(temp_path, FILE_MODE)
        if overwrite:
            os.replace(temp_path, path)
        else:
            _publish_no_clobber(temp_path, path)
    finally:
        # After a successful replace the temp name is gone; otherwise clean up whatever was written.
        IN_FLIGHT.discard(temp_path)
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()


def _publish_no_clobber(temp_path: Path, path: Path) -> None:
    """Move temp_path to path unless path exists, atomically where the filesystem has hard links."""
    try:
        # link() fails if the target exists, so a file another rank created meanwhile is never replaced.
        os.link(temp_path, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
    except OSError:  # no hard links here (some network/FUSE filesystems): check, then replace
        if path.exists():
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
        os.replace(temp_path, path)
    # After a successful link the temp name is removed by _atomic_target's cleanup.


def write_mp4(
    path: str | Path,
    frames: np.ndarray | torch.Tensor,
    fps: int = 8,
    crf: int = 5,
    overwrite: bool = True,
) -> Path:
    """Encode uint8 frames (T, H, W, 3) as an H.264 yuv420p MP4 at `fps` and return the path."""
    frames = _as_uint8_frames(frames)
    num_frames, height, width, _ = frames.shape
    # yuv420p subsamples chroma 2x2, so libx264 rejects odd sizes; we refuse rather than resize.
    if height % 2 or width % 2:
        raise ValueError(f"frame size {height}x{width} must be even in both height and width for yuv420p")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf={crf} is out of range; allowed 0..51")
    if fps <= 0:
        raise ValueError(f"fps={fps} must be positive")

    if mp4_encoder_problem():  # before any file is made: one line naming what is missing and how to get it
        raise MissingEncoder(mp4_encoder_problem())
    if not has_imageio_ffmpeg():  # an offline node may lack the wheel but have an ffmpeg on PATH
        with _atomic_target(path, overwrite, suffix=".mp4") as temp_path:
            write_with_path_ffmpeg(temp_path, frames, fps, int(crf))
        return Path(path)

    with _atomic_target(path, overwrite, suffix=".mp4") as temp_path:
        writer = imageio_ffmpeg().write_frames(
            str(temp_path),
            (width, height),
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            fps=fps,
            codec="libx264",
            quality=None,  # None: imageio adds no -crf of its own; ours goes in output_params
            macro_block_size=1,  # 1: never let imageio rescale the frames to a multiple of 16
            ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf))],
        )
        writer.send(None)  # start the generator (launches ffmpeg)
        try:
            for frame in frames:
                writer.send(frame)
        finally:
            # close() waits for ffmpeg to finish the file; it also runs on error so ffmpeg exits.
            writer.close()
        # imageio_ffmpeg does not check ffmpeg's exit status, so a failed encode shows up as a missing/empty file.
        if not temp_path.exists() or temp_path.stat().st_size == 0:
            raise RuntimeError(f"ffmpeg produced no output for {path} ({num_frames} frames of {height}x{width})")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, overwrite: bool = True) -> Path:
    """Write `obj` as indented JSON (non-JSON values via str) atomically and return the path."""
    with _atomic_target(path, overwrite, suffix=".json") as temp_path:
        with open(temp_path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
    return Path(path)


def write_safetensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], overwrite: bool = True) -> Path:
    """Save a dict of tensors as a safetensors file atomically and return the path."""
    from safetensors.torch import save_file

    # safetensors refuses non-contiguous tensors and shared storage; a contiguous clone avoids both.
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    with _atomic_target(path, overwrite, suffix=".safetensors") as temp_path:
        save_file(tensors, str(temp_path))
    return Path(path)


def write_png(path: str | Path, frame: np.ndarray | torch.Tensor, overwrite: bool = True) -> Path:
    """Write one uint8 frame (H, W, 3) (or a one-frame (1, H, W, 3) video) as a PNG atomically."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    frames = _as_uint8_frames(frame[None] if getattr(frame, "ndim", 0) == 3 else frame)
    if frames.shape[0] != 1:
        raise ValueError(f"write_png takes one frame, got {frames.shape[0]} (shape {tuple(frames.shape)})")
    with _atomic_target(path, overwrite, suffix=".png") as temp_path:
        Image.fromarray(frames[0]).save(temp_path, format="PNG")
    return Path(path)


def frames_to_pil(frames: np.ndarray | torch.Tensor) -> list[Image.Image]:
    """Turn uint8 frames (T, H, W, 3) into a list of RGB PIL images."""
    return [Image.fromarray(frame) for frame in _as_uint8_frames(frames)]


def read_mp4_metadata(path: str | Path) -> dict[str, Any]:
    """ffmpeg's view of a video file: codec, pix_fmt, size (W, H), fps, duration."""
    reader = imageio_ffmpeg().read_frames(str(path))
    try:
        return next(reader)
    finally:
        reader.close()


def read_mp4_frames(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file into a uint8 array (T, H, W, 3)."""
    reader = imageio_ffmpeg().read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    finally:
        reader.close()
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(frames)  # (T, H, W, 3)
