"""The three ways users start a run give the same image: plain python, torchrun, torch.distributed.launch."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spawn import free_port
from test_cli import ENTRY

ARGS = ["model=tiny", "time_length=0", "width=512", "height=512", "seed=5", "prompt=a red square", "progress=false",
        "save_latents=true"]
LAUNCHERS = {
    "python": [],
    "torchrun": ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}"],
    "launch": ["-m", "torch.distributed.launch", "--nnodes", "1", "--nproc-per-node", "2", "--master-port", "{port}"],
}


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = {}
    for name, launcher in LAUNCHERS.items():
        cwd = tmp_path_factory.mktemp(name)
        launcher = [arg.format(port=free_port()) for arg in launcher]
        result = subprocess.run([sys.executable, *launcher, str(ENTRY), *ARGS, "save_path=img.mp4"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=300)
        out[name] = (cwd, result)
    return out


@pytest.mark.parametrize("name", ["torchrun", "launch"])
def test_multi_rank_launchers_match_one_process(runs, name):
    cwd, result = runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    one_cwd, one = runs["python"]
    assert one.returncode == 0, one.stderr[-3000:]
    latents = load_file(str(cwd / "img.latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, load_file(str(one_cwd / "img.latents.safetensors"))["latents"],
                               atol=1e-5, rtol=1e-5)
    written = sorted(p.name for p in cwd.iterdir() if p.is_file())
    assert written == ["img.json", "img.latents.safetensors", "img.png"]  # rank 0 alone writes, no stray files
