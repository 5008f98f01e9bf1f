"""Which ffmpeg writes the MP4s: imageio-ffmpeg's (the declared dependency, a 68 MB wheel), else an `ffmpeg` on
PATH (an offline node may have one and not the wheel: README "Offline GPU nodes"), else a one-line error.

Nothing here imports imageio_ffmpeg, torch or numpy at module load, so a PNG or latents need none of them and the
app's checks (launch/checks.py) can refuse an MP4 run before loading anything.
"""
import importlib.util
import shutil
import subprocess

MISSING = ("writing an MP4 needs imageio-ffmpeg or an ffmpeg binary on PATH, and neither is here: "
           "`pip install imageio-ffmpeg` (offline: from a wheelhouse, README \"Offline GPU nodes\") or put ffmpeg "
           "on PATH; an image (time_length=0, a .png) needs neither")


class MissingEncoder(RuntimeError):
    """No ffmpeg to write an MP4 with."""


def has_imageio_ffmpeg() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def mp4_encoder_problem():
    """None when an MP4 can be written here, else the one-line reason (MISSING)."""
    return None if has_imageio_ffmpeg() or shutil.which("ffmpeg") else MISSING


def imageio_ffmpeg():
    """The imageio_ffmpeg module; MissingEncoder (naming the package and how to get it) when it is not installed."""
    try:
        import imageio_ffmpeg as module
    except ImportError:
        raise MissingEncoder(MISSING) from None
    return module


def write_with_path_ffmpeg(path, frames, fps: int, crf: int) -> None:
    """Encode uint8 frames (T, H, W, 3) with the `ffmpeg` on PATH, with the settings imageio-ffmpeg's writer is
    given in k4flash/outputs.py (rgb24 in; H.264, yuv420p, the crf; no audio)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise MissingEncoder(MISSING)
    _, height, width, _ = frames.shape
    command = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
               "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
               "-crf", str(crf), str(path)]
    result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
    if result.returncode:
        last = (result.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{exe} exited {result.returncode} writing {path}: {last}")
