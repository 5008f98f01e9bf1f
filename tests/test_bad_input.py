"""Every kind of bad input, through the real entry point: one `error:` line naming the value and what
is allowed, exit status 2, before any weights load, and nothing written.

The runs are in-process (Hydra's compose + launch.cli.run) so the whole table costs
seconds; tests/test_cli.py runs the same entry point as a subprocess.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from launch.cli import run
from launch.config import register_configs
from k4flash.tiny import tiny_dit_state_dict
from k4flash.published import DIT_FILENAME
from test_cli import ENTRY

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["model=tiny", "time_length=0", "width=512", "height=512", "progress=false", "save_path=out/v.mp4"]
# The tiny model, but loaded from a weights folder the test damages (model.builtin=false).
FROM_FOLDER = ["model.builtin=false", "download=false"]


def run_cli(overrides, capsys):
    """(exit status, the stderr lines starting with 'error:') of one in-process run."""
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr  # one line, never a stack
    return exit_info.value.code, [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("K4FLASH_CACHE", str(tiny_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def weights_copy(workdir, tiny_weights):
    """A writable copy of the tiny weights for the test to damage."""
    return Path(shutil.copytree(tiny_weights, workdir / "weights"))


def written(workdir: Path) -> list:
    """Files the run created (inputs the test put there are excluded)."""
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                  if p.is_file() and not p.relative_to(workdir).parts[0] in ("weights", "inputs"))


@pytest.mark.parametrize("overrides, message", [
    (["height=500"], "height x width = 500x512 is not allowed at resolution 512; allowed (height x width): 512x512,"),
    (["time_length=-1"], "time_length=-1 is out of range; allowed: 0..63 seconds"),
    (["time_length=64"], "time_length=64 is out of range; allowed: 0..63 seconds (0 = one image; RoPE covers 128"),
    (["prompt=''"], "prompt='' is empty; give a non-empty text prompt"),
    (["prompt=' \t '"], "is empty; give a non-empty text prompt"),
    (["seed=-3"], "seed=-3 must be a non-negative integer"),
    (["dtype=float8"], "dtype='float8' is not supported; allowed: auto, float32, bfloat16, float16"),
    (["device=tpu:0"], "device='tpu:0' is not a torch device"),
    pytest.param(["device=cuda"], "device 'cuda:0': CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is visible: device=cuda is valid input here")),
])
def test_bad_request_values(workdir, capsys, overrides, message):
    status, errors = run_cli([*TINY, *overrides], capsys)
    assert status == 2 and len(errors) == 1 and message in errors[0], errors
    assert written(workdir) == []


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tp=null"], "tensor-parallel degree 3 does not divide"),  # 8 heads, ff 256
    (4, ["parallel.tp=3"], "parallel.tp=3 does not divide the world size 4; allowed: [1, 2, 4]"),
    (6, ["parallel.tp=6"], "tensor-parallel degree 6 does not divide"),
    (4, ["parallel.ulysses=3"], "parallel.ulysses=3 does not divide the world size 4; allowed: [1, 2, 4]"),
    (6, ["parallel.ulysses=3"], "Ulysses degree 3 with tp=2 leaves 8/6 heads per rank"),
    (8, ["parallel.ulysses=2", "parallel.tp=8"], "parallel.tp=8 with parallel.ulysses=2 does not divide the world "
                                                "size 8; allowed tp: [1, 2, 4]"),
    (2, ["parallel.plan=fastest"], "parallel.plan='fastest': allowed values are ['manual', 'auto']"),
    (4, ["parallel.plan=auto", "parallel.gpu_memory_gb=1"], "parallel.plan=auto: no plan of the DiT on 4 GPU(s) "
                                                            "fits 1 GB per GPU"),
    (1, ["text_encoder.offload=gpu"], "text_encoder.offload='gpu': allowed values are ['auto', 'none', "
                                      "'after_encode', 'cpu']"),
    (1, ["mode=train"], "mode='train': allowed values are ['generate', 'serve']"),
    (1, ["mode=serve", "serve.port=70000"], "serve.port=70000 must be a port number, 1-65535"),
    (1, ["mode=serve", "text_encoder.offload=after_encode"], "a server needs it for every request"),
])
def test_parallel_layouts_that_cannot_work_fail_before_any_process_group(workdir, capsys, monkeypatch, world,
                                                                          overrides, message):
    # The check runs before init_process_group, so a fake launcher environment is enough.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    status, errors = run_cli([*TINY, *overrides], capsys)
    assert status == 2 and len(errors) == 1 and message in errors[0], errors
    assert not torch.distributed.is_initialized()
    assert written(workdir) == []


def test_missing_weights_folder(workdir, capsys):
    status, errors = run_cli([*TINY, *FROM_FOLDER, "weights_dir=nowhere"], capsys)
    assert status == 2 and "dit weights not found at nowhere/kandinsky4_distil_512.pt" in errors[0], errors
    assert "ai-forever/kandinsky-4-t2v-flash" in errors[0]
    assert written(workdir) == []


@pytest.mark.parametrize("damage, message", [
    ("truncate_dit", "cannot read DiT checkpoint"),
    ("garbage_dit", "cannot read DiT checkpoint"),
    ("dit_is_folder", "dit weights at weights/kandinsky4_distil_512.pt are not a file"),
    ("misshaped_dit", "'text_embeddings.in_layer.weight' has shape (128, 64), the model expects (128, 32)"),
    ("no_t5_weights", "text_encoder weights at weights/text_encoder are incomplete: none of model.safetensors"),
    ("no_vae_config", "vae weights at weights/vae are incomplete: none of config.json is there"),
])
def test_damaged_weights_are_named(workdir, weights_copy, capsys, damage, message):
    dit = weights_copy / DIT_FILENAME
    if damage == "truncate_dit":
        dit.write_bytes(dit.read_bytes()[: dit.stat().st_size // 2])
    elif damage == "garbage_dit":
        dit.write_bytes(os.urandom(4096))
    elif damage == "dit_is_folder":
        dit.unlink()
        dit.mkdir()
    elif damage == "misshaped_dit":
        state = tiny_dit_state_dict()
        state["text_embeddings.in_layer.weight"] = torch.zeros(128, 64)
        torch.save(state, dit)
    elif damage == "no_t5_weights":
        (weights_copy / "text_encoder" / "model.safetensors").unlink()
    elif damage == "no_vae_config":
        (weights_copy / "vae" / "config.json").unlink()
    status, errors = run_cli([*TINY, *FROM_FOLDER, "weights_dir=weights"], capsys)
    assert status == 2 and len(errors) == 1 and message in errors[0], errors
    assert written(workdir) == []


def test_the_undamaged_copy_runs(workdir, weights_copy, capsys):
    """The control for the table above: the same folder, undamaged, generates."""
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        cfg = compose("config", overrides=[*TINY, *FROM_FOLDER, "weights_dir=weights"])
    run(cfg)
    assert written(workdir) == ["out/v.json", "out/v.png"]


def test_unwritable_output_location(workdir, capsys):
    (workdir / "inputs").mkdir()
    (workdir / "inputs" / "blocker").write_text("a file where a folder should be")
    (workdir / "inputs" / "p.txt").write_text("a red square\n")
    status, errors = run_cli([*TINY, "save_path=inputs/blocker/v.mp4"], capsys)
    assert status == 2 and len(errors) == 1, errors
    assert "save_path" in errors[0] and "inputs/blocker is not a writable directory" in errors[0], errors
    status, errors = run_cli([*TINY, "prompts_file=inputs/p.txt", "output_dir=inputs/blocker/videos"], capsys)
    assert status == 2 and len(errors) == 1, errors
    assert "output_dir" in errors[0] and "inputs/blocker is not a writable directory" in errors[0], errors
    assert written(workdir) == []


def test_prompts_file_bad_line_is_named(workdir, capsys):
    (workdir / "inputs").mkdir()
    (workdir / "inputs" / "p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "x", "time_length": 99}\n')
    status, errors = run_cli([*TINY, "prompts_file=inputs/p.jsonl", "output_dir=videos"], capsys)
    assert status == 2 and "line 2: time_length=99 is out of range" in errors[0], errors
    assert written(workdir) == [] and not (workdir / "videos").exists()


def test_non_integer_time_length_is_refused_by_the_schema(tmp_path, tiny_cache):
    """Types are Hydra's to check (the structured schema): non-zero exit, the value named, nothing written."""
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ENTRY), *TINY, "time_length=1.5"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # Hydra's message, exit 1 (README "When things go wrong")
    assert "time_length=1.5" in result.stderr and "could not be converted to Integer" in result.stderr
    assert list(tmp_path.iterdir()) == []  # not even Hydra's outputs/ folder
