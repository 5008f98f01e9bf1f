"""Writing results to disk: MP4 videos, JSON records and safetensors files.

Every writer is atomic: it writes a dot-prefixed temporary file in the target's
directory and `os.replace`s it onto the target, so a reader (or a crashed run)
never sees a half-written file, and a failure leaves nothing behind. A filesystem that
refuses the write (full, over quota, read-only) is one `OutputStorageError` naming the target,
however the writer reported it (ffmpeg's text, safetensors' Rust error, a plain OSError).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from .ffmpeg import MISSING, MissingEncoder, has_imageio_ffmpeg, imageio_ffmpeg, mp4_encoder_problem

# A filesystem that refuses every write from now on: full, over quota, read-only. A batch stops on these (README
# "When things go wrong"): the next prompt would fail the same way.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class OutputStorageError(OSError):
    """The output's filesystem refused the write (errno: one of STORAGE_ERRNOS); filename: the target, never the
    temporary file. One line: `cannot write <path>: No space left on device`."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


def storage_errno(err: BaseException):
    """The STORAGE_ERRNOS code an error stands for, or None: an OSError's errno, else the C library's text for it
    in the message (ffmpeg and safetensors report the OSError as text)."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno if err.errno in STORAGE_ERRNOS else None
    return _storage_errno_named(str(err))


def _storage_errno_named(text: str):
    return next((code for code in STORAGE_ERRNOS if os.strerror(code) in text), None)


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
_OUTPUT = threading.local()  # .published: the files one_output() has seen published on this thread, or None


def discard_in_flight() -> None:
    """Remove every temporary file still being written: for a process about to end without unwinding
    (parallel/health.py's exit from a rank whose main thread is stuck), which runs no `finally`."""
    for temp_path in list(IN_FLIGHT):
        with contextlib.suppress(OSError):
            temp_path.unlink()


@contextlib.contextmanager
def _atomic_target(path: str | Path, overwrite: bool, suffix: str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The temporary name keeps `suffix` because ffmpeg picks the container from the extension. A filesystem
    that refuses the write raises OutputStorageError naming `path`.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    # pid + random part: several ranks/threads may write next to each other at once.
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    IN_FLIGHT.add(temp_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temp_path
        os.chmod(temp_path, FILE_MODE)
        if overwrite:
            os.replace(temp_path, path)
        else:
            _publish_no_clobber(temp_path, path)
        if getattr(_OUTPUT, "published", None) is not None:
            _OUTPUT.published.append(path)
    except Exception as err:
        code = storage_errno(err)
        if code is None or isinstance(err, OutputStorageError):
            raise
        raise OutputStorageError(code, os.strerror(code), str(path)) from err
    finally:
        # After a successful replace the temp name is gone; otherwise clean up whatever was written.
        IN_FLIGHT.discard(temp_path)
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()


@contextlib.contextmanager
def one_output(files, overwrite: bool) -> Iterator[None]:
    """The files of one output (video or image, latents, sidecar: `files`), written all or none.

    When a write fails after others were published, those are removed, and with `overwrite` the older files of
    the set too (a set partly replaced is no set): no sidecar marks something finished that is not, and nothing
    orphaned is left. When nothing was published yet, nothing is touched.
    """
    outer, _OUTPUT.published = getattr(_OUTPUT, "published", None), []
    published = _OUTPUT.published
    try:
        yield
    except BaseException:
        if published:
            for path in (files if overwrite else published):
                with contextlib.suppress(OSError):
                    Path(path).unlink()
        raise
    finally:
        _OUTPUT.published = outer


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
    # imageio-ffmpeg's binary, else (an offline node may lack the wheel) an ffmpeg on PATH
    exe = imageio_ffmpeg().get_ffmpeg_exe() if has_imageio_ffmpeg() else shutil.which("ffmpeg")
    with _atomic_target(path, overwrite, suffix=".mp4") as temp_path:
        _encode_mp4(exe, temp_path, frames, fps, int(crf), path)
        if not temp_path.exists() or temp_path.stat().st_size == 0:
            raise RuntimeError(f"ffmpeg produced no output for {path} ({num_frames} frames of {height}x{width})")
    return Path(path)


def _encode_mp4(exe, temp_path: Path, frames: np.ndarray, fps: int, crf: int, path) -> None:
    """Encode frames (T, H, W, 3) to H.264 yuv420p in temp_path with ffmpeg, as imageio-ffmpeg's writer would (the
    same arguments), but watching how ffmpeg ends: its messages are kept off the terminal and its exit status
    decides, so that a failed write (a disk full mid-file: ffmpeg prints it, exits 228 and leaves a truncated file
    that imageio-ffmpeg returns as done) raises, naming `path` and ffmpeg's last message."""
    if exe is None:
        raise MissingEncoder(MISSING)
    _, height, width, _ = frames.shape
    command = [exe, "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24",
               "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error",
               "-crf", str(crf), str(temp_path)]
    # A session of its own, as imageio-ffmpeg does: a Ctrl-C reaches this process, which stops ffmpeg itself.
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    messages = []
    reader = threading.Thread(target=lambda: messages.append(process.stderr.read()), daemon=True)
    reader.start()
    try:
        with contextlib.suppress(BrokenPipeError):  # ffmpeg stopped early: its status and messages say why
            for frame in frames:
                process.stdin.write(frame)
            process.stdin.flush()
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        status = process.wait()
    except BaseException:  # Ctrl-C, SIGTERM: do not wait for the encode
        process.kill()
        process.wait()
        raise
    finally:
        reader.join()
        process.stderr.close()
    if status:
        text = b"".join(messages).decode(errors="replace").strip().splitlines()
        # The cause is the line naming an errno's text when there is one (a full disk: "Error writing trailer: No
        # space left on device"), else ffmpeg's last line.
        cause = next((line for line in reversed(text) if _storage_errno_named(line)), None)
        cause = cause or (text[-1] if text else "no message")
        raise RuntimeError(f"ffmpeg exited with status {status} writing {path}: {cause.strip()}")


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
