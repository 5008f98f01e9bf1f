"""Which ffmpeg writes the MP4s: imageio-ffmpeg's (the declared dependency, a 68 MB wheel), else an `ffmpeg` on
PATH (an offline node may have one and not the wheel: README "Offline GPU nodes"), else a one-line error.

Nothing here imports imageio_ffmpeg, torch or numpy at module load, so a PNG or latents need none of them and the
app's checks (launch/checks.py) can refuse an MP4 run before loading anything.
"""
import importlib.util
import shutil

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
