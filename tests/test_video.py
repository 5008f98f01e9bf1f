import json
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import k4flash.outputs as outputs
from k4flash.outputs import (
    frames_to_pil,
    read_mp4_frames,
    read_mp4_metadata,
    write_json_atomic,
    write_mp4,
    write_png,
    write_safetensors_atomic,
)


def smooth_frames(num_frames=9, height=64, width=96):
    """Moving colour gradients: smooth content survives yuv420p chroma subsampling almost exactly."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 40 + 2 * x + 3 * t
    green = 30 + 2 * y + 5 * t
    blue = 200 - x - y + 0 * t
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).clip(0, 255).astype(np.uint8)  # (T, H, W, 3)


def test_mp4_round_trip_is_h264_yuv420p_at_8_fps(tmp_path):
    frames = smooth_frames()
    path = write_mp4(tmp_path / "clip.mp4", frames, crf=0)
    meta = read_mp4_metadata(path)
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 8
    back = read_mp4_frames(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3  # ≈ 1.4 here: RGB↔YUV rounding and chroma subsampling


def test_mp4_default_crf_is_near_lossless_and_accepts_tensors(tmp_path):
    frames = torch.from_numpy(smooth_frames())
    path = write_mp4(tmp_path / "clip.mp4", frames)
    back = read_mp4_frames(path)
    assert back.shape == tuple(frames.shape)
    assert np.abs(back.astype(int) - frames.numpy().astype(int)).mean() < 3


def test_mp4_keeps_sizes_that_are_not_multiples_of_16(tmp_path):
    frames = smooth_frames(num_frames=5, height=40, width=72)  # multiples of 8 only
    back = read_mp4_frames(write_mp4(tmp_path / "clip.mp4", frames, crf=0))
    assert back.shape == (5, 40, 72, 3)


def test_mp4_single_frame(tmp_path):
    back = read_mp4_frames(write_mp4(tmp_path / "one.mp4", smooth_frames(num_frames=1)))
    assert back.shape == (1, 64, 96, 3)


def test_writers_leave_no_temp_files_and_create_parents(tmp_path):
    target = tmp_path / "a" / "b" / "clip.mp4"
    write_mp4(target, smooth_frames(num_frames=3))
    write_json_atomic(target.with_suffix(".json"), {"x": 1})
    write_safetensors_atomic(target.with_suffix(".safetensors"), {"z": torch.zeros(2)})
    write_png(target.with_suffix(".png"), smooth_frames(num_frames=1)[0])
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.json", "clip.mp4", "clip.png", "clip.safetensors"]


def test_overwrite_false_raises_and_keeps_old_file(tmp_path):
    target = tmp_path / "clip.mp4"
    write_mp4(target, smooth_frames(num_frames=3), overwrite=False)  # a new file is fine
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="clip.mp4"):
        write_mp4(target, smooth_frames(num_frames=5), overwrite=False)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    write_mp4(target, smooth_frames(num_frames=5), overwrite=True)
    assert read_mp4_frames(target).shape[0] == 5


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((3, 64, 96, 3), dtype=np.float32), "uint8"),
        (np.zeros((64, 96, 3), dtype=np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((3, 64, 96, 4), dtype=np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((3, 63, 96, 3), dtype=np.uint8), "even"),
    ],
)
def test_mp4_rejects_bad_frames_before_writing(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_mp4(tmp_path / "clip.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def test_json_atomic(tmp_path):
    target = tmp_path / "meta.json"
    write_json_atomic(target, {"path": tmp_path, "n": 3}, overwrite=False)
    assert json.loads(target.read_text()) == {"path": str(tmp_path), "n": 3}
    assert target.read_text().startswith('{\n  "')  # indent=2
    with pytest.raises(FileExistsError):
        write_json_atomic(target, {"n": 4}, overwrite=False)
    assert json.loads(target.read_text())["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_json_atomic_failure_leaves_nothing(tmp_path):
    class Unserialisable:
        def __str__(self):
            raise RuntimeError("cannot stringify")

    with pytest.raises(RuntimeError):
        write_json_atomic(tmp_path / "meta.json", {"x": Unserialisable()})
    assert list(tmp_path.iterdir()) == []


def test_safetensors_atomic_round_trip(tmp_path):
    latents = torch.randn(3, 8, 12, 16).permute(0, 3, 1, 2)  # non-contiguous view
    target = write_safetensors_atomic(tmp_path / "latents.safetensors", {"latents": latents})
    assert torch.equal(load_file(target)["latents"], latents)
    with pytest.raises(FileExistsError):
        write_safetensors_atomic(target, {"latents": latents}, overwrite=False)


def test_png_is_lossless(tmp_path):
    from PIL import Image

    frame = smooth_frames(num_frames=1)[0]
    target = write_png(tmp_path / "image.png", frame)
    assert np.array_equal(np.asarray(Image.open(target).convert("RGB")), frame)
    with pytest.raises(ValueError, match="one frame"):
        write_png(tmp_path / "two.png", smooth_frames(num_frames=2))


def test_frames_to_pil():
    frames = smooth_frames(num_frames=2)
    images = frames_to_pil(torch.from_numpy(frames))
    assert len(images) == 2
    assert images[0].mode == "RGB" and images[0].size == (96, 64)
    assert np.array_equal(np.asarray(images[1]), frames[1])


def test_every_writer_publishes_with_the_umask_mode(tmp_path):
    """The .mp4, .png, .json and .latents.safetensors beside each other get one mode: 0o666 less the umask
    (safetensors alone used to leave 0600)."""
    import os
    import stat

    previous = os.umask(0o027)  # a mode that differs from both 0600 and 0644
    try:
        import importlib
        importlib.reload(outputs)
        written = [outputs.write_mp4(tmp_path / "v.mp4", smooth_frames()),
                   outputs.write_png(tmp_path / "v.png", smooth_frames(1)[0]),
                   outputs.write_json_atomic(tmp_path / "v.json", {"a": 1}),
                   outputs.write_safetensors_atomic(tmp_path / "v.latents.safetensors", {"x": torch.ones(2)})]
    finally:
        os.umask(previous)
        importlib.reload(outputs)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {oct(0o640)}


# --- without imageio-ffmpeg (an offline node: README "Offline GPU nodes") ----------------------------------------

@pytest.fixture
def no_imageio_ffmpeg(monkeypatch, tmp_path):
    """imageio_ffmpeg not importable and nothing on PATH but an empty folder."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` raises ImportError
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path / "bin"


def test_without_imageio_ffmpeg_images_and_latents_are_written_and_an_mp4_is_one_clear_error(tmp_path,
                                                                                             no_imageio_ffmpeg):
    out = tmp_path / "out"
    write_png(out / "x.png", smooth_frames(1)[0])
    write_safetensors_atomic(out / "x.latents.safetensors", {"latents": torch.zeros(2, 3)})
    with pytest.raises(outputs.MissingEncoder) as caught:
        write_mp4(out / "x.mp4", smooth_frames())
    message = str(caught.value)
    assert "\n" not in message and "pip install imageio-ffmpeg" in message and "ffmpeg binary on PATH" in message
    assert sorted(p.name for p in out.iterdir()) == ["x.latents.safetensors", "x.png"]  # no half-written MP4


def test_without_imageio_ffmpeg_the_ffmpeg_on_path_writes_the_mp4(tmp_path, no_imageio_ffmpeg):
    """imageio-ffmpeg's own binary stands in for a system ffmpeg; the file is what imageio-ffmpeg would write."""
    (no_imageio_ffmpeg / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    frames = smooth_frames()
    path = write_mp4(tmp_path / "clip.mp4", frames, crf=0)
    reference = tmp_path / "reference.mp4"
    sys.modules.pop("imageio_ffmpeg")  # the real package again, to write the reference and read both
    sys.modules["imageio_ffmpeg"] = imageio_ffmpeg
    write_mp4(reference, frames, crf=0)
    meta = read_mp4_metadata(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 8
    assert np.array_equal(read_mp4_frames(path), read_mp4_frames(reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "clip.mp4", "reference.mp4"]


def test_the_cli_refuses_a_video_without_an_ffmpeg_before_loading(tmp_path):
    """exit 2, one `error:` line, nothing written (tests/test_offline_node.py writes an image without it)."""
    code = ("import sys; sys.modules['imageio_ffmpeg'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "  # the checkout first, as running the script does
            "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    script = str(outputs.Path(__file__).resolve().parents[1] / "run_inference_distil.py")
    env = {"PATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "K4FLASH_CACHE": str(tmp_path / "no-cache")}
    result = subprocess.run([sys.executable, "-c", code, script, "model=tiny", "save_path=x.mp4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "imageio-ffmpeg" in errors[0], result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
