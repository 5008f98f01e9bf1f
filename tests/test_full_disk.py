"""A full disk while writing outputs: the temporary file goes, one `error:` line names the path and "No space left",
a batch stops (exit 1) keeping what it finished and resumes after space is freed, a server fails that video and
goes on. The disk is a small tmpfs mounted in tmp_path (root, or CAP_SYS_ADMIN: CI runs as root; elsewhere these
tests skip, saying so).

Sizes with model=tiny (noise, so it compresses badly): a 1 s 512x512 MP4 is ~2.1 MB, its latents 0.77 MB, a
512x512 PNG ~0.63 MB, a sidecar ~2.5 KB. Every subprocess case prints how long the run took from the moment the
tmpfs filled (polled every 10 ms) to its exit: README "When things go wrong".
"""
import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.server import Server
from k4flash import outputs
from k4flash.outputs import (one_output, read_mp4_frames, write_json_atomic, write_mp4, write_png,
                             write_safetensors_atomic)

ENTRY = Path(__file__).resolve().parents[1] / "run_inference_distil.py"
ROOT = ENTRY.parent
NO_SPACE = "No space left on device"
GEOMETRY = ["width=512", "height=512", "progress=false"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` for the test's length; the test is skipped (with the reason) where mounting is not
    allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: a full disk is simulated with a small tmpfs")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root or CAP_SYS_ADMIN; CI runs as root): "
                    f"{mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it


def resize(path: Path, size: str) -> None:
    """Free space the way an operator would: grow the filesystem (the files stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


class FullWatch:
    """When the disk at `path` filled: the first poll (every 5 ms, from a thread) that finds no free block, or, for a
    fault too quick to be seen full (a 0.8 MB latents file fills it and is removed within a millisecond), the first
    that finds space freed: the writers publish by rename or link, so only a failed write's cleanup frees any."""

    def __init__(self, path: Path):
        self.path, self.full_at, self._stop = path, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        free = os.statvfs(self.path).f_bavail
        while not self._stop.is_set() and self.full_at is None:
            now = os.statvfs(self.path).f_bavail
            if now == 0 or now > free:
                self.full_at = time.monotonic()
            free = now
            time.sleep(0.005)

    def since_full(self):
        """Seconds since the disk filled, or None if it was never seen to (each test asserts that last, after what
        it checks of the run)."""
        self._stop.set()
        self._thread.join()
        return None if self.full_at is None else time.monotonic() - self.full_at


def env(tiny_cache, **more):
    return dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **more)


def run_watched(command, cwd, environment, disk: Path, timeout=420):
    """Run `command` to its end: (returncode, stdout, stderr, seconds from the disk filling to the exit)."""
    with open(cwd / "stdout.log", "w+") as out, open(cwd / "stderr.log", "w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=err)
        watch = FullWatch(disk)
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        after_full = watch.since_full()
        out.seek(0)
        err.seek(0)
        return process.returncode, out.read(), err.read(), after_full


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def noise(num_frames=8, height=256, width=256, seed=0):
    """Frames that compress badly (~0.2 MB per 256x256 frame in the MP4), as the tiny model's do."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def report(case: str, seconds) -> None:
    print(f"[full disk] {case}: " + ("the disk was never seen full" if seconds is None else
                                     f"{seconds:.2f} s from the disk filling to the end"))


def assert_filled(seconds) -> None:
    assert seconds is not None, "the disk was never seen full: this case did not hit a full disk"


# --- the writers, on a full disk (no model) ------------------------------------------------------------------------

def test_an_mp4_that_does_not_fit_is_one_error_naming_it_and_leaves_the_old_file(tmp_path):
    """ffmpeg reports the full disk as text and an exit status (imageio-ffmpeg's writer returned a truncated file as
    done, and printed ffmpeg's seven lines): one OutputStorageError naming the target, no temporary file, and the
    file that was there untouched."""
    with tmpfs(tmp_path / "disk", "512k") as disk:
        target = disk / "clip.mp4"
        target.write_bytes(b"the previous video")
        with pytest.raises(outputs.OutputStorageError) as caught:
            write_mp4(target, noise())
        assert str(caught.value) == f"cannot write {target}: {NO_SPACE}"
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert files(disk) == ["clip.mp4"] and target.read_bytes() == b"the previous video"


def test_an_mp4_that_fits_is_published_whole(tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        assert read_mp4_frames(write_mp4(disk / "clip.mp4", noise())).shape == (8, 256, 256, 3)
        assert files(disk) == ["clip.mp4"]


@pytest.mark.parametrize("writer", ["latents", "json", "png"])
def test_every_writer_names_its_target_on_a_full_disk(tmp_path, writer):
    """safetensors reports the full disk as a SafetensorError's text, json and PIL as OSError(28) without a path."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        target, write = {
            "latents": (disk / "x.latents.safetensors",
                        lambda t: write_safetensors_atomic(t, {"latents": torch.zeros(100_000)})),
            "json": (disk / "x.json", lambda t: write_json_atomic(t, {"text": "x" * 200_000})),
            "png": (disk / "x.png", lambda t: write_png(t, noise(1, 512, 512)[0])),
        }[writer]
        with pytest.raises(outputs.OutputStorageError, match=f"^cannot write {target}: {NO_SPACE}$"):
            write(target)
        assert files(disk) == []


def test_a_failing_ffmpeg_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    """Any ffmpeg failure (here a stand-in that writes half a file and exits 1) raises with ffmpeg's last line, and
    leaves neither its temporary file nor a changed target (what test_video's failing imageio writer checked)."""
    fake = tmp_path / "ffmpeg"
    fake.write_text('#!/bin/sh\nfor last; do :; done\nhead -c 1000 > "$last"\n'
                    'echo "[out#0/mp4 @ 0x1] Error muxing a packet" >&2\necho "Conversion failed!" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(outputs.imageio_ffmpeg(), "get_ffmpeg_exe", lambda: str(fake))
    target = tmp_path / "out" / "clip.mp4"
    with pytest.raises(RuntimeError, match=f"ffmpeg exited with status 1 writing {target}: Conversion failed!"):
        write_mp4(target, noise(2, 64, 64))
    assert files(target.parent) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        write_mp4(target, noise(2, 64, 64))
    assert files(target.parent) == ["clip.mp4"] and target.read_bytes() == b"old"


@pytest.mark.parametrize("overwrite", [False, True])
def test_one_output_is_written_all_or_none(tmp_path, overwrite):
    """A write failing after the video was published removes the video (nothing orphaned, nothing looking finished);
    with overwrite the older files of the set go too (an old sidecar would mark the new video finished). A failure
    before anything was published touches nothing."""
    video, latents, sidecar = (tmp_path / n for n in ("v.mp4", "v.latents.safetensors", "v.json"))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if overwrite:  # a finished output of an earlier run
        for path in (video, latents, sidecar):
            path.write_text("old")
    with pytest.raises(OSError):
        with one_output([video, latents, sidecar], overwrite):
            raise full  # the video itself failed: nothing of this call was published
    assert files(tmp_path) == (["v.json", "v.latents.safetensors", "v.mp4"] if overwrite else [])
    with pytest.raises(OSError):
        with one_output([video, latents, sidecar], overwrite):
            write_json_atomic(video, {"new": "video"}, overwrite=overwrite)
            raise full  # the latents failed
    assert files(tmp_path) == []
    with one_output([video, sidecar], overwrite):  # and a set that succeeds is all there
        write_json_atomic(video, {}, overwrite=overwrite)
        write_json_atomic(sidecar, {}, overwrite=overwrite)
    assert files(tmp_path) == ["v.json", "v.mp4"]


# --- the CLI -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case, size, save_latents, refused", [
    ("mp4", "1m", "false", "v.mp4"),  # the 2.1 MB MP4 does not fit
    ("latents", "2600k", "true", "v.latents.safetensors"),  # the MP4 fits, its latents after it do not
])
def test_one_video_on_a_full_disk_is_one_error_line_and_nothing_left(tmp_path, tiny_cache, case, size, save_latents,
                                                                    refused):
    with tmpfs(tmp_path / "disk", size) as disk:
        code, out, err, after_full = run_watched(
            [sys.executable, str(ENTRY), "model=tiny", "prompt=a red square", "time_length=1", "seed=1", *GEOMETRY,
             "save_path=disk/v.mp4", f"save_latents={save_latents}"], tmp_path, env(tiny_cache), disk)
        report(f"one video, full during the {case} write", after_full)
        assert code == 1, err[-3000:]
        assert error_lines(err) == [f"error: cannot write disk/{refused}: {NO_SPACE}; nothing half-written is left: "
                                    "free space and run it again"], err[-3000:]
        assert "Traceback" not in err and "Error writing" not in err, err[-3000:]  # nor ffmpeg's own lines
        assert files(disk) == []  # no temporary file, and no video without its latents and sidecar
        assert_filled(after_full)


PROMPTS = [{"prompt": "a red square", "time_length": 0},  # a 0.6 MB image: fits on the 1 MB disk
           {"prompt": "a blue circle", "time_length": 1},  # a 2.1 MB video: does not
           {"prompt": "a green triangle", "time_length": 0}]  # never started: the batch stopped


@pytest.mark.slow
def test_a_batch_stops_on_a_full_disk_keeps_what_it_finished_and_resumes(tmp_path, tiny_cache):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    command = [sys.executable, str(ENTRY), "model=tiny", "prompts_file=prompts.jsonl", "output_dir=disk", *GEOMETRY]
    with tmpfs(tmp_path / "disk", "1m") as disk:
        code, out, err, after_full = run_watched(command, tmp_path, env(tiny_cache), disk)
        report("a batch, full during prompt 1's MP4", after_full)
        assert code == 1, err[-3000:]
        assert error_lines(err) == [
            f"error: cannot write disk/00001-a-blue-circle.mp4: {NO_SPACE}; the batch stopped with 1 of 3 prompt(s) "
            "done (kept; nothing half-written is left): free space and re-run the same command to resume"], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        finished = {name: (disk / name).read_bytes() for name in ("00000-a-red-square.png", "00000-a-red-square.json")}
        mtimes = {name: (disk / name).stat().st_mtime_ns for name in finished}
        assert files(disk) == sorted(finished)  # prompt 1 left nothing, prompt 2 never started

        resize(disk, "16m")
        resumed = subprocess.run(command, cwd=tmp_path, env=env(tiny_cache), capture_output=True, text=True,
                                 timeout=420)
        code, out, err = resumed.returncode, resumed.stdout, resumed.stderr
        assert code == 0, err[-3000:]
        assert "resuming: 1 of 3 prompts already done" in out + err
        assert "2 written, 1 skipped (already done), 0 failed" in out + err
        assert {name: (disk / name).read_bytes() for name in finished} == finished  # prompt 0 untouched, not redone
        assert {name: (disk / name).stat().st_mtime_ns for name in finished} == mtimes
        assert files(disk) == ["00000-a-red-square.json", "00000-a-red-square.png", "00001-a-blue-circle.json",
                               "00001-a-blue-circle.mp4", "00002-a-green-triangle.json",
                               "00002-a-green-triangle.png"]
        assert_filled(after_full)



@pytest.mark.slow
def test_a_two_rank_batch_stops_cleanly_while_the_other_group_is_mid_video(tmp_path, tiny_cache):
    """dp 2 (parallel.tp=1): group 1 finds the disk full (its second image) while group 0 is in the middle of a
    video. Group 0 ends that video (here it does not fit either), then neither takes another prompt; every rank
    ends, rank 0 prints one `error:` line (the first refused write, not a rank "failing"), status 1."""
    prompts = [{"prompt": "a red square", "time_length": 1},  # group 0: a video, ~12 s of decode on a CPU
               {"prompt": "a blue circle", "time_length": 0},  # group 1: an image that fits
               {"prompt": "a green triangle", "time_length": 0},  # group 0: never started
               {"prompt": "a yellow star", "time_length": 0}]  # group 1: the image that does not fit
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    command = ["bash", str(ROOT / "launch" / "torchrun.sh"), "model=tiny", "prompts_file=prompts.jsonl",
               "output_dir=disk", "parallel.tp=1", "parallel.timeout_s=60", *GEOMETRY]
    with tmpfs(tmp_path / "disk", "1m") as disk:
        code, out, err, after_full = run_watched(command, tmp_path, env(tiny_cache, NPROC_PER_NODE="2"), disk)
        report("2 ranks (dp 2), full on group 1 while group 0 is mid-video", after_full)
        assert code == 1, err[-3000:]
        lines = error_lines(err)
        assert len(lines) == 1 and NO_SPACE in lines[0], err[-3000:]
        assert lines[0].startswith(("error: cannot write disk/00003-a-yellow-star.png:",
                                    "error: cannot write disk/00000-a-red-square.mp4:")), lines
        assert "the batch stopped with 1 of 4 prompt(s) done" in lines[0], lines
        assert "distributed run failed" not in err and "Traceback" not in err, err[-3000:]
        assert files(disk) == ["00001-a-blue-circle.json", "00001-a-blue-circle.png"]
        assert not [line for line in (out + err).splitlines() if "00002" in line]  # prompt 2 never started
        assert_filled(after_full)


@pytest.mark.slow
def test_a_tp2_group_stops_together(tmp_path, tiny_cache):
    """tp 2: one model group of two ranks. Its first rank alone writes, and finds the disk full; both ranks must stop
    before the next prompt (the other one, starting it alone, would wait for ever in its first collective)."""
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    command = ["bash", str(ROOT / "launch" / "torchrun.sh"), "model=tiny", "prompts_file=prompts.txt",
               "output_dir=disk", "parallel.tp=2", "parallel.timeout_s=60", "time_length=0", *GEOMETRY]
    with tmpfs(tmp_path / "disk", "512k") as disk:  # not even one 0.6 MB image fits
        code, out, err, after_full = run_watched(command, tmp_path, env(tiny_cache, NPROC_PER_NODE="2"), disk)
        report("2 ranks (tp 2), full during the first image", after_full)
        assert code == 1, err[-3000:]
        assert error_lines(err) == [
            f"error: cannot write disk/00000-a-red-square.png: {NO_SPACE}; the batch stopped with 0 of 2 prompt(s) "
            "done (kept; nothing half-written is left): free space and re-run the same command to resume"], err[-3000:]
        assert "distributed run failed" not in err and "Traceback" not in err, err[-3000:]
        assert files(disk) == []
        assert_filled(after_full)


@pytest.mark.slow
def test_the_server_fails_a_video_that_does_not_fit_and_keeps_serving(tmp_path, tiny_cache):
    """serve.output_dir on a 1 MB disk: a 1 s video (2.1 MB) fails with the reason, leaving no temporary file; once
    space is freed the same server completes the next one."""
    with tmpfs(tmp_path / "served", "1m") as disk:
        server = Server(tmp_path, tiny_cache, 1)
        try:
            assert server.output_dir == disk
            status, body, _ = server.request("POST", "/v1/videos", {"prompt": "a blue circle", "seconds": "1",
                                                                    "size": "512x512", "seed": 1}, key=None)
            assert status == 200, body
            video_id = json.loads(body)["id"]
            watch = FullWatch(disk)
            record = server.wait(video_id, timeout=300, key=None)
            after_full = watch.since_full()
            report("the server, full during a video's MP4", after_full)
            assert record["status"] == "failed", record
            assert record["error"] == {"code": "write_failed",
                                       "message": f"cannot write {disk / video_id}.mp4: {NO_SPACE}"}, record
            assert files(disk) == [f"{video_id}.record.json"]  # no temporary file, no partial output
            assert_filled(after_full)

            resize(disk, "16m")  # space freed: the same server goes on
            status, body, _ = server.request("POST", "/v1/videos", {"prompt": "a red square", "seconds": "0",
                                                                    "size": "512x512"}, key=None)
            assert status == 200, body
            second = json.loads(body)["id"]
            assert server.wait(second, timeout=300, key=None)["status"] == "completed"
            assert (disk / f"{second}.png").is_file() and (disk / f"{second}.json").is_file()
            assert not [p for p in disk.iterdir() if p.name.startswith(".")]
        finally:
            assert server.stop() == 0, server.output()
