"""The README tests itself: every fenced command is run by a test, or marked [GPU], [weights], [SLURM] or [network]
and checked here as far as a CPU can (README "Set up"; tests/readme_commands.py reads the commands)."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from readme_commands import claimed_starts, fenced_commands, readme_command, unchecked

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = sorted(Path(__file__).parent.glob("test_*.py"))
MARKED = [c for c in fenced_commands() if c.needs]


def _env(tiny_cache, **extra):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "K4FLASH_API_KEY"):
        env.pop(key, None)  # a user's shell, not a launched rank
    return env


def _errors(result) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _argv(text: str) -> list:
    """A README command's argv as run from any folder: the checkout's script by its path, this Python."""
    words = shlex.split(text)
    words = [str(ROOT / w) if w == "run_inference_distil.py" else w for w in words]
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def _runs(script: str, command: str) -> bool:
    """Whether a line of the shell script `script` runs `command` (python3 for python; pip's -q aside)."""
    def words(line):
        return [w for w in shlex.split(line.replace("python3", "python"), comments=True) if w != "-q"]
    wanted = words(command)
    return any(words(line)[:len(wanted)] == wanted for line in script.splitlines() if line.strip())


# --- every command is run or marked ------------------------------------------------------------------------------

def test_every_readme_command_is_run_by_a_test_or_marked():
    commands = fenced_commands()
    assert len(commands) > 25 and len(MARKED) > 10  # the reader sees the README's blocks
    missing = unchecked(commands, claimed_starts(TEST_FILES))
    assert missing == [], "README commands no test runs and nothing marks:\n" + "\n".join(
        f"README.md:{c.line}: {c.text[:100]}" for c in missing)


def test_an_unmarked_command_added_to_the_readme_fails_the_check():
    """Negative control: one new fenced command, neither run nor marked, is reported; marking it is enough."""
    readme = (ROOT / "README.md").read_text()
    added = readme + "\n```bash\npython run_inference_distil.py model=tiny seed=99   # a new example\n```\n"
    starts = claimed_starts(TEST_FILES)
    assert [c.text for c in unchecked(fenced_commands(added), starts)] == [
        "python run_inference_distil.py model=tiny seed=99"]
    assert unchecked(fenced_commands(added.replace("# a new example", "# [GPU] a new example")), starts) == []


def test_each_test_runs_a_command_the_readme_still_shows():
    for start in claimed_starts(TEST_FILES):
        readme_command(start)  # one README command starts with it


# --- commands run here -------------------------------------------------------------------------------------------

def test_the_install_and_test_commands_are_what_ci_runs():
    """CI's script (.ci/run, on every submission) installs with the README's command and runs its test command."""
    script = (ROOT / ".ci" / "run").read_text()
    assert _runs(script, "python -m " + readme_command("pip install -e").text)
    assert _runs(script, readme_command("python -m pytest").text)
    assert not _runs(script, "python -m pytest -q tests/test_cli.py")  # the check can fail


@pytest.mark.slow
@pytest.mark.parametrize("written", ["kandinsky4_distil_512.safetensors", "kandinsky4_distil_512.fp8.safetensors"])
def test_the_convert_commands(tmp_path, tiny_weights, written):
    command = {"kandinsky4_distil_512.safetensors": readme_command("python -m parallel.convert weights/"),
               "kandinsky4_distil_512.fp8.safetensors": readme_command("python -m parallel.convert --quantize fp8"),
               }[written].text
    (tmp_path / "weights").mkdir()
    shutil.copy(tiny_weights / "kandinsky4_distil_512.pt", tmp_path / "weights")
    result = subprocess.run(_argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == sorted(["kandinsky4_distil_512.pt", written])


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("prompts", [("prompts.txt", "a red square\n\na blue circle\n"), (
    "prompts.jsonl", '{"prompt": "a red square", "seed": 5, "time_length": 0, "width": 512, "height": 512}\n')])
def test_the_batch_commands_with_the_tiny_model(tmp_path, tiny_cache, prompts):
    (tmp_path / prompts[0]).write_text(prompts[1])
    command = {"prompts.txt": readme_command("python run_inference_distil.py prompts_file=prompts.txt"),
               "prompts.jsonl": readme_command("python run_inference_distil.py prompts_file=prompts.jsonl")}[prompts[0]]
    result = subprocess.run([*_argv(command.text), "model=tiny", "time_length=0", "width=512", "height=512",
                             "progress=false"], cwd=tmp_path, env=_env(tiny_cache), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    if prompts[0] == "prompts.txt":  # the blank line keeps its index
        assert names == ["00000-a-red-square.json", "00000-a-red-square.png", "00002-a-blue-circle.json",
                         "00002-a-blue-circle.png"]
    else:
        assert names == ["00000-a-red-square.json", "00000-a-red-square.png"]


@pytest.mark.slow
def test_the_cpu_server_command_and_the_openai_client_block(tmp_path, tiny_cache):
    """`model=tiny mode=serve` on a free port, then the README's client block against it (a 1 s video instead of
    12 s, the port the server got), then SIGTERM: every step as documented."""
    from parallel.spawn import free_port

    port = free_port()
    server = subprocess.Popen([*_argv(readme_command("python run_inference_distil.py model=tiny mode=serve").text),
                               f"serve.port={port}", "progress=false"],
        cwd=tmp_path, env=_env(tiny_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = readme_command("from openai import OpenAI").text
        client = client.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace('seconds="12"', 'seconds="1"')
        assert f"127.0.0.1:{port}" in client and 'seconds="1"' in client
        waiter = f"import time, urllib.request\nfor _ in range(600):\n    try:\n        " \
                 f"urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=1); break\n    except OSError:\n" \
                 f"        time.sleep(0.2)\n"
        result = subprocess.run([sys.executable, "-c", waiter + client], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / "fox.mp4").read_bytes()[4:8] == b"ftyp"  # an MP4, downloaded
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=120)[0]
    assert server.returncode == 0, output[-2000:]
    assert "serving tiny on http://127.0.0.1" in output


@pytest.mark.slow
def test_the_tiny_pipeline_block(tmp_path, tiny_cache):
    block = readme_command("from k4flash import get_tiny_pipeline").text
    check = "\nassert len(frames) == 9 and frames[0].size == (672, 384), (len(frames), frames[0].size)\n"
    result = subprocess.run([sys.executable, "-c", block + check], cwd=tmp_path, env=_env(tiny_cache),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # return_frames writes nothing


# --- marked commands, checked as far as a CPU can ----------------------------------------------------------------

def _launch_parts(command):
    """(ranks, the overrides) of a command that runs run_inference_distil.py, under a launcher or not."""
    words = shlex.split(command.text)
    ranks = int(words[words.index("--nproc-per-node") + 1]) if "--nproc-per-node" in words else 1
    overrides = [w for w in words[words.index("run_inference_distil.py") + 1:] if w != "..."]
    return ranks, overrides


def _check_before_loading(overrides, ranks, cwd, monkeypatch):
    """Everything launch/ checks before it loads or forms a process group, as rank 1 of `ranks` would (rank 0
    would also bind serve.port)."""
    from hydra import compose, initialize_config_dir

    from launch.checks import check_config, check_serve, read_jobs
    from launch.config import register_configs
    from launch.planning import request_plan

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    monkeypatch.setenv("RANK", str(min(1, ranks - 1)))
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    check_config(cfg)
    if cfg.mode == "serve":
        check_serve(cfg)
    else:
        read_jobs(cfg)
    return request_plan(cfg)


@pytest.mark.parametrize("command", MARKED, ids=[f"line{c.line}" for c in MARKED])
def test_a_marked_command_is_checked_as_far_as_a_cpu_can(command, tmp_path, tiny_cache, monkeypatch):
    text, env = command.text, _env(tiny_cache, CUDA_VISIBLE_DEVICES="")
    if text.startswith("pip install torch"):  # [GPU], [network]: the package's own requirement, installed first
        assert "torch>=2.5" in (ROOT / "setup.cfg").read_text()
        script = (ROOT / ".ci" / "run").read_text()
        assert script.index("pip install -q torch==") < script.index("pip install -q -e")
        return
    if text.startswith("from k4flash import get_T2V_pipeline"):  # [GPU, weights]: no CUDA here, refused at once
        setup = text.split("\npipe(")[0]
        result = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0 and "CUDA is not available here" in result.stderr.splitlines()[-1]
        return
    words = shlex.split(text)
    if "launch/slurm.sbatch" in words:  # [SLURM]: outside sbatch the script refuses; its overrides pass the checks
        script = words.index("launch/slurm.sbatch")
        result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *words[script + 1:]], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "submit it with sbatch" in result.stderr
        (tmp_path / "prompts.txt").write_text("a red square\n")
        _check_before_loading([w for w in words[script + 1:] if not w.startswith("serve.api_key=")], 8, tmp_path,
                              monkeypatch)
        return
    if words[0] == "launch/torchrun.sh":  # [GPU]: "every GPU of this node" is one CPU rank here: tp=4 is refused
        (tmp_path / "prompts.txt").write_text("a red square\n")
        result = subprocess.run([str(ROOT / words[0]), *words[1:]], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2 and _errors(result) == [
            "error: parallel.tp=4 does not divide the world size 1; allowed: [1]"], result.stderr[-2000:]
        return
    if "bench." in text:  # [GPU]: each benchmark refuses a machine without CUDA with exit status 2
        result = subprocess.run(_argv(text), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and ("CUDA" in result.stderr or "GPUs" in result.stderr), result.stderr[-2000:]
        return
    assert "run_inference_distil.py" in words, f"README.md:{command.line}: no check for {text!r}"
    ranks, overrides = _launch_parts(command)
    if "weights" in command.needs and ranks == 1:  # run as written: refused before loading, the files named
        result = subprocess.run(_argv(text), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and len(_errors(result)) == 1, result.stderr[-2000:]
        assert "dit weights not found at weights/kandinsky4_distil_512.pt" in _errors(result)[0]
        return
    if "prompts_file=prompts.txt" in overrides:
        (tmp_path / "prompts.txt").write_text("a red square\n")
    request = _check_before_loading(overrides, ranks, tmp_path, monkeypatch)  # [GPU]: 8 ranks' checks pass
    assert request.auto or request.plan.world_size == ranks
