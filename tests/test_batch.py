"""Prompt batches: parsing, safe names, resume, a failing prompt, and dp × tp over 4 ranks."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch.batch import read_prompts_file, slugify

from parity import assert_parity, break_env
from readme_commands import readme_command
from test_cli import ENTRY

ROOT = ENTRY.parent

DEFAULTS = dict(seed=10, time_length=0, width=512, height=512)


def test_text_prompts_file_names_and_seeds(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red square\n\n  ../../etc/passwd \u2603 Caf\u00e9!  \n")
    jobs = read_prompts_file(path, DEFAULTS, tmp_path / "out")
    assert [j.index for j in jobs] == [0, 2]
    assert [j.seed for j in jobs] == [10, 12]
    assert jobs[0].save_path == tmp_path / "out" / "00000-a-red-square.mp4"
    assert jobs[1].save_path.name == "00002-etc-passwd-cafe.mp4"
    assert all(j.save_path.parent == tmp_path / "out" for j in jobs)
    assert jobs[0].output_path.suffix == ".png"  # time_length 0: an image


def test_jsonl_overrides_per_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "seed": 3, "time_length": 1, "width": 672, "height": 384}) + "\n")
    (job,) = read_prompts_file(path, DEFAULTS, tmp_path)
    assert (job.seed, job.time_length, job.width, job.height) == (3, 1, 672, 384)
    assert job.output_path.suffix == ".mp4"


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "x", "width": 500}\n', r"line 2: height x width = 512x500 is not allowed"),
    ('{"prompt": "ok"}\nnot json\n', r"line 2: not valid JSON"),
    ('{"promt": "typo"}\n', r"line 1: expected a JSON object with a \"prompt\" key"),
    ('{"prompt": "x", "steps": 8}\n', r"line 1: unknown key 'steps'"),
    ('{"prompt": "x", "time_length": -1}\n', r"line 1: time_length=-1 is out of range"),
    ('{"prompt": "   "}\n', r"line 1: prompt='   ' is empty"),
    ("\n\n", r"has no prompts"),
])
def test_bad_lines_are_named(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts_file(path, DEFAULTS, tmp_path)


def test_slugify():
    assert slugify("A red square!") == "a-red-square"
    assert slugify("\u65e5\u672c\u8a9e") == "prompt"
    assert len(slugify("word " * 40)) <= 48 and not slugify("word " * 40).endswith("-")


def _env(tiny_cache):
    return dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


PROMPTS = "a red square\na blue circle\na green triangle\na yellow star\n"
BATCH = ["model=tiny", "prompts_file=prompts.txt", "output_dir=out", "time_length=0", "width=512", "height=512",
         "progress=false", "save_latents=true"]


@pytest.mark.slow
def test_batch_resumes_and_survives_a_failing_prompt(tmp_path, tiny_cache):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    (tmp_path / "out" / "00001-a-blue-circle.png").mkdir(parents=True)  # a directory where the image must go
    first = subprocess.run([sys.executable, str(ENTRY), *BATCH], cwd=tmp_path, env=_env(tiny_cache),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "1 prompt(s) failed" in first.stderr, first.stderr[-2000:]
    done = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert done == ["00000-a-red-square.json", "00002-a-green-triangle.json", "00003-a-yellow-star.json"]
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if not p.name.startswith("00001")}
    assert not list((tmp_path / "out").glob("00001-*.*.*"))  # the failed prompt left no partial files

    (tmp_path / "out" / "00001-a-blue-circle.png").rmdir()
    second = subprocess.run([sys.executable, str(ENTRY), *BATCH], cwd=tmp_path, env=_env(tiny_cache),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "3 of 4 prompts already done" in second.stdout + second.stderr
    assert (tmp_path / "out" / "00001-a-blue-circle.png").is_file()
    for name, mtime in kept.items():  # nothing finished was redone
        assert (tmp_path / "out" / name).stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files


def dp2_tp2_command():
    """The README's CPU batch on dp 2 x tp 2 (NPROC_PER_NODE=4 launch/torchrun.sh ... parallel.tp=2): (environment,
    argv), with images for speed and the latents saved to compare."""
    words = shlex.split(readme_command("NPROC_PER_NODE=4 launch/torchrun.sh model=tiny prompts_file=").text)
    assign, script, overrides = words[0], words[1], words[2:]
    assert overrides[:2] == BATCH[:2] and "parallel.tp=2" in overrides
    name, value = assign.split("=")
    return {name: value}, [str(ROOT / script), *overrides, *BATCH[3:]]


@pytest.fixture(scope="module")
def dp_tp_runs(tmp_path_factory, tiny_cache):
    """The batch on one process, on dp 2 x tp 2, and on dp 2 x tp 2 with every rank loading its neighbour's
    column-parallel rows (the negative control): name -> (output folder, log)."""
    runs = {}
    launched_env, launched = dp2_tp2_command()
    for name, broken in (("one", None), ("dp2tp2", None), ("dp2tp2, slice shifted", "shifted_slice")):
        cwd = tmp_path_factory.mktemp("batch")
        (cwd / "prompts.txt").write_text(PROMPTS)
        env = dict(_env(tiny_cache), **(break_env(broken) if broken else {}))
        if name == "one":
            command = [sys.executable, str(ENTRY), *BATCH]
        else:
            command, env = launched, dict(env, **launched_env)
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (cwd, result.stdout + result.stderr)
    return runs


def check_dp_tp_batch(runs, name):
    """The dp x tp batch gave the one-rank latents for every prompt; each group took every second prompt and its
    first rank alone wrote and logged it; rank 0 summed up; nothing else was written."""
    cwd, log = runs[name]
    one_cwd, one_log = runs["one"]
    expected = sorted((one_cwd / "out").glob("*.latents.safetensors"))
    assert len(expected) == 4
    for one in expected:
        assert_parity(load_file(str(cwd / "out" / one.name))["latents"], load_file(str(one))["latents"],
                      atol=1e-5, rtol=1e-5, what=f"latents of {one.name}")
    assert len(list((cwd / "out").glob("*.png"))) == 4
    # Every output is logged once, by the group that wrote it (rank 0 for group 0, rank 2 for group 1),
    # and rank 0 ends with a summary.
    for folder, text in ((cwd, log), (one_cwd, one_log)):
        for png in (folder / "out").glob("*.png"):
            assert text.count(f"wrote {Path('out') / png.name}") == 1, (png.name, text[-3000:])
        assert "batch finished in" in text and "4 written, 0 skipped (already done), 0 failed" in text, text[-3000:]
    # Dealt every D-th prompt: group 0 (ranks 0-1) writes prompts 0 and 2, group 1 (ranks 2-3) prompts 1 and 3,
    # each by its first rank only.
    lines = [line for line in log.splitlines() if "wrote out/" in line]
    by_rank = {index: [line.split(" - ")[-1].split(": wrote")[0] if ": wrote" in line else "rank 0"
                       for line in lines if index in line]
               for index in ("00000", "00001", "00002", "00003")}
    assert by_rank == {"00000": ["rank 0"], "00001": ["rank 2"], "00002": ["rank 0"], "00003": ["rank 2"]}, lines
    # Nothing but the outputs and the prompts: Hydra writes no folder or log file unless asked.
    assert sorted(p.name for p in cwd.iterdir()) == ["out", "prompts.txt"]


@pytest.mark.slow
def test_dp2_x_tp2_gives_the_one_rank_videos(dp_tp_runs):
    check_dp_tp_batch(dp_tp_runs, "dp2tp2")


@pytest.mark.slow
def test_the_dp_tp_check_fails_when_a_slice_is_shifted(dp_tp_runs):
    """Negative control: every rank loads its neighbour's q/k/v and MLP-in rows (tests/breaks); the batch still
    runs to the end, and the same check must fail on the latents."""
    cwd, log = dp_tp_runs["dp2tp2, slice shifted"]
    assert "[tests/breaks] parallel.load broken" in log
    with pytest.raises(AssertionError, match="latents of 00000"):
        check_dp_tp_batch(dp_tp_runs, "dp2tp2, slice shifted")


def test_world_not_divisible_by_tp_fails_before_loading(tmp_path, tiny_cache):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    env = dict(_env(tiny_cache), WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    result = subprocess.run([sys.executable, str(ENTRY), *BATCH, "parallel.tp=3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "parallel.tp=3 does not divide the world size 4; allowed: [1, 2, 4]" in result.stderr


@pytest.mark.slow
def test_a_video_without_its_sidecar_is_redone_and_the_sidecar_goes_last(tmp_path, tiny_cache, monkeypatch):
    """A killed job can leave an image whose sidecar never came; the sidecar marks "finished", so that prompt is
    done again, and the pipeline writes the sidecar after the image and the latents."""
    (tmp_path / "prompts.txt").write_text("a red square\n")
    (tmp_path / "out").mkdir()
    half = tmp_path / "out" / "00000-a-red-square.png"
    half.write_bytes(b"the image of a job killed before its sidecar")
    result = subprocess.run([sys.executable, str(ENTRY), *BATCH], cwd=tmp_path, env=_env(tiny_cache),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 written, 0 skipped (already done)" in result.stdout + result.stderr
    assert half.read_bytes()[:4] == b"\x89PNG" and half.with_suffix(".json").is_file()

    # The order of the writes, seen from inside: image, latents, then the sidecar.
    from k4flash import get_T2V_pipeline, pipeline
    from k4flash.tiny import TINY_DIT_PARAMS, ensure_tiny_weights
    order = []
    for name in ("write_png", "write_safetensors_atomic", "write_json_atomic"):
        original = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda *a, _f=original, _n=name, **k: (order.append(_n), _f(*a, **k))[1])
    monkeypatch.setenv("K4FLASH_CACHE", str(tiny_cache))
    pipe = get_T2V_pipeline("cpu", cache_dir=ensure_tiny_weights(), dit_params=TINY_DIT_PARAMS, download=False)
    generation = pipe.generate("a red square", time_length=0, width=512, height=512, seed=1, progress=False)
    pipe.write_outputs(generation, tmp_path / "api.mp4", save_latents=True)
    assert order == ["write_png", "write_safetensors_atomic", "write_json_atomic"]


@pytest.mark.parametrize("video, sidecar, complete", [(True, True, True), (True, False, False),
                                                       (False, True, False), (False, False, False)])
def test_a_prompt_is_done_only_with_its_video_and_its_sidecar(tmp_path, video, sidecar, complete):
    """What a re-run skips: both files, whichever one is missing (a sidecar without its video too) is redone."""
    path = tmp_path / "p.txt"
    path.write_text("a red square\n")
    for time_length in (0, 1):  # an image, a video
        (job,) = read_prompts_file(path, dict(DEFAULTS, time_length=time_length), tmp_path / f"out{time_length}")
        job.save_path.parent.mkdir()
        if video:
            job.output_path.write_bytes(b"media")
        if sidecar:
            job.sidecar_path.write_text("{}")
        assert job.is_complete() is complete, (time_length, video, sidecar)


@pytest.mark.slow
def test_each_lines_seed_is_the_one_of_an_independent_run(tmp_path, tiny_cache, tiny_weights):
    """A prompts file's videos are those of one-prompt runs with each line's seed: the line's own (JSONL), else
    the run's seed + the line's index. Compared with independent generations of each prompt, not with a batch."""
    from k4flash import get_T2V_pipeline
    from k4flash.tiny import TINY_DIT_PARAMS

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red square", "seed": 77}\n\n{"prompt": "a blue circle"}\n')
    result = subprocess.run([sys.executable, str(ENTRY), "model=tiny", "prompts_file=prompts.jsonl", "output_dir=out",
                             "seed=40", "time_length=0", "width=512", "height=512", "save_latents=true",
                             "progress=false"], cwd=tmp_path, env=_env(tiny_cache), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pipe = get_T2V_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False)
    for name, prompt, seed in (("00000-a-red-square", "a red square", 77), ("00002-a-blue-circle", "a blue circle", 42)):
        alone = pipe.generate(prompt, time_length=0, width=512, height=512, seed=seed, progress=False)
        batch = load_file(str(tmp_path / "out" / f"{name}.latents.safetensors"))["latents"]
        assert_parity(batch, alone.latents, atol=1e-5, rtol=1e-5, what=f"latents of {name}")
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["seed"] == seed
