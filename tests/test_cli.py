"""`run_inference_distil.py` as a user runs it: Hydra overrides, outputs, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import strip_launcher_args
from readme_commands import readme_command

ENTRY = Path(__file__).resolve().parents[1] / "run_inference_distil.py"


def run_cli(cwd, tiny_cache, *overrides, timeout=300):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ENTRY), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_tiny_image_run_writes_image_latents_and_sidecar(tmp_path, tiny_cache):
    result = run_cli(tmp_path, tiny_cache, "model=tiny", "time_length=0", "width=512", "height=512", "seed=3",
                     "save_path=out/pic.mp4", "save_latents=true", "progress=false")
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" in result.stdout + result.stderr
    assert (tmp_path / "out/pic.png").exists()
    sidecar = json.loads((tmp_path / "out/pic.json").read_text())
    assert sidecar["model"] == "tiny" and sidecar["untrained"] is True and sidecar["seed"] == 3
    assert sidecar["config"]["time_length"] == 0 and "load_s" in sidecar["timings"]
    assert (tmp_path / "out/pic.latents.safetensors").exists()


@pytest.mark.parametrize("override, message", [
    ("height=500", "height x width = 500x672 is not allowed"),
    ("time_length=-2", "time_length=-2 is out of range"),
    ("prompt=' '", "prompt=' ' is empty"),
    ("dtype=float8", "dtype='float8' is not supported"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_cache, override, message):
    result = run_cli(tmp_path, tiny_cache, "model=tiny", override, "save_path=out/v.mp4")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_weights_dir_names_the_file(tmp_path, tiny_cache):
    result = run_cli(tmp_path, tiny_cache, f"weights_dir={tmp_path / 'nowhere'}", "save_path=v.mp4")
    assert result.returncode == 2
    assert "kandinsky4_distil_512.pt" in result.stderr and "ai-forever/kandinsky-4-t2v-flash" in result.stderr


def test_existing_output_is_not_clobbered(tmp_path, tiny_cache):
    (tmp_path / "v.png").write_bytes(b"keep")
    result = run_cli(tmp_path, tiny_cache, "model=tiny", "time_length=0", "width=512", "height=512", "save_path=v.mp4")
    assert result.returncode == 2 and "overwrite=true" in result.stderr
    assert (tmp_path / "v.png").read_bytes() == b"keep"


def test_typo_in_override_fails_with_hydra_message(tmp_path, tiny_cache):
    result = run_cli(tmp_path, tiny_cache, "model=tiny", "time_lenght=3")
    assert result.returncode == 1 and "time_lenght" in result.stderr  # Hydra's own error: exit 1 (README)


def test_launcher_local_rank_is_accepted_and_cfg_job_prints_config(tmp_path, tiny_cache):
    result = run_cli(tmp_path, tiny_cache, "--local-rank=0", "model=tiny", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "time_length: 1" in result.stdout and "name: tiny" in result.stdout


def test_strip_launcher_args(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["prog", "--local-rank=3", "seed=1", "--local_rank", "3", "prompt=x"]
    strip_launcher_args(argv)
    assert argv == ["prog", "seed=1", "prompt=x"] and os.environ["LOCAL_RANK"] == "3"


@pytest.mark.slow
def test_the_readme_demo_line_can_be_repeated_and_leaves_only_its_outputs(tmp_path, tiny_cache):
    """The set-up block's demo command, run twice in a fresh folder (as an image, to keep it quick): both
    succeed, and the folder holds the output and its sidecar only: no Hydra outputs/, no log file."""
    overrides = readme_command("python run_inference_distil.py model=tiny save_path=demo.mp4").text.split()[2:]
    assert "overwrite=true" in overrides and any(o.startswith("save_path=") for o in overrides)
    for _ in range(2):
        result = run_cli(tmp_path, tiny_cache, *overrides, "time_length=0", "width=512", "height=512",
                         "progress=false")
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.png"]


def test_help_lists_every_key_as_written(tmp_path, tiny_cache):
    """`--help`, where the unknown-key error sends users: exit 0, every schema key listed, and a field doc's
    `$K4FLASH_API_KEY` printed as written (it used to reach Hydra's string.Template: KeyError, a traceback)."""
    from launch.config import RunConfig, _rows

    result = run_cli(tmp_path, tiny_cache, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "serve.api_key (str or null; default null): mode=serve: when set (or $K4FLASH_API_KEY)" in result.stdout
    assert "model: kandinsky4_flash, tiny" in result.stdout  # Hydra's one placeholder still filled in
    missing = [name for name, *_ in _rows(RunConfig) if f"  {name} (" not in result.stdout]
    assert missing == []


@pytest.mark.parametrize("doc", ["uses $HOME and $$", "an interpolation ${model.name} stays text", "50$ or ${"])
def test_help_template_keeps_any_dollar_text_literal(doc):
    """What Hydra does with the template (OmegaConf reads it, then string.Template fills $APP_CONFIG_GROUPS)
    gives back the text as written; negative control: the text put in unescaped fails or changes."""
    import string

    from omegaconf import OmegaConf

    from launch.config import _literal_for_hydra

    def render(template):
        return string.Template(OmegaConf.create({"t": template}).t).substitute(APP_CONFIG_GROUPS="G")
    text = f"groups: $APP_CONFIG_GROUPS; {doc}"
    assert render(_literal_for_hydra(text, keep="$APP_CONFIG_GROUPS")) == f"groups: G; {doc}"
    with pytest.raises(Exception):
        assert render(text) == f"groups: G; {doc}"


@pytest.mark.parametrize("existing, overrides", [
    ("demo.json", ["time_length=0"]),  # the sidecar of the image the run would write
    ("demo.png", ["time_length=0"]),  # the image itself (save_path names the .mp4)
    ("demo.latents.safetensors", ["time_length=1", "save_latents=true"]),
    ("demo.json", ["time_length=1"]),  # a video's sidecar
])
def test_every_output_a_run_would_write_is_refused_before_anything_loads(tmp_path, tiny_cache, existing, overrides):
    """Not only the video: an existing sidecar or latents file is refused up front too (exit 2, one line naming
    it), so no weights load, nothing is half-written and the user's file is untouched."""
    (tmp_path / existing).write_text('{"mine": 1}')
    result = run_cli(tmp_path, tiny_cache, "model=tiny", "width=512", "height=512", "save_path=demo.mp4",
                     "progress=false", *overrides)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert f"{existing} already exists" in errors[0] and "overwrite=true" in errors[0]
    assert "loaded tiny" not in result.stdout + result.stderr  # refused before loading
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == '{"mine": 1}'


@pytest.mark.parametrize("args, status, expected", [
    (["+time_lenght=3"], 2, "error: unknown config key 'time_lenght' (did you mean time_length?)"),
    (["seed=abc"], 1, "Value 'abc' of type 'str' could not be converted to Integer"),
    (["--cfg", "job", "--resolve"], 0, "time_length: 1\nwidth: 672\nheight: 384"),
])
def test_the_spellings_the_readme_names(tmp_path, tiny_cache, args, status, expected):
    """README "Thousands of videos": the typo Hydra suggests fails naming the key (2), an ill-typed value is
    Hydra's (1), and `--cfg job --resolve` prints the values, not `${model.demo...}` (0)."""
    result = run_cli(tmp_path, tiny_cache, "model=tiny", *args)
    assert result.returncode == status, result.stderr[-2000:]
    assert expected in (result.stdout if status == 0 else result.stderr), result.stdout[-1000:] + result.stderr[-1000:]
    assert "${" not in result.stdout and list(tmp_path.iterdir()) == []
