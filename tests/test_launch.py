"""The ways users start a run give the same image: plain python, torchrun, torch.distributed.launch and
launch/torchrun.sh; the launcher script exits with the ranks' documented status and one error line."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from parity import assert_parity, break_env
from parallel.spawn import free_port
from test_cli import ENTRY

pytestmark = pytest.mark.slow  # launchers and servers: `-m "not slow"` leaves them out

ARGS = ["model=tiny", "time_length=0", "width=512", "height=512", "seed=5", "prompt=a red square", "progress=false",
        "save_latents=true"]
LAUNCH_SH = ENTRY.parent / "launch" / "torchrun.sh"
LAUNCHERS = {
    "python": [sys.executable, str(ENTRY)],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}",
                 str(ENTRY)],
    "launch": [sys.executable, "-m", "torch.distributed.launch", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-port", "{port}", str(ENTRY)],
    "torchrun.sh": ["bash", str(LAUNCH_SH)],  # NPROC_PER_NODE=2 (below)
}
# torch.distributed.launch also runs with vae.parallel=false (its first rank decodes alone, as one process does)
EXTRA = {"launch": ["vae.parallel=false"]}
# negative controls: name -> (launcher, K4FLASH_TEST_BREAK, NPROC_PER_NODE)
BROKEN = {"torchrun.sh, all-reduce dropped": ("torchrun.sh", "all_reduce", "2"),
          "torchrun.sh, one rank started": ("torchrun.sh", None, "1")}


def _env(tiny_cache, **extra):
    return dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHON=sys.executable, **extra)


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    out = {}
    for name, (launcher, broken, nproc) in {**{n: (n, None, "2") for n in LAUNCHERS}, **BROKEN}.items():
        cwd = tmp_path_factory.mktemp("run")
        command = [arg.format(port=free_port()) for arg in LAUNCHERS[launcher]]
        extra = dict(NPROC_PER_NODE=nproc, **(break_env(broken) if broken else {}))
        result = subprocess.run([*command, *ARGS, *EXTRA.get(name, []), "save_path=img.mp4"], cwd=cwd,
                                env=_env(tiny_cache, **extra),
                                capture_output=True, text=True, timeout=300)
        out[name] = (cwd, result)
    return out


def check_same_image_on_two_ranks(runs, name):
    """The run exited 0 on 2 ranks, wrote only the image, latents and sidecar, and its latents are the one process's."""
    cwd, result = runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(float32, 2 rank(s): dp 1 x ulysses 1 x tp 2)" in result.stdout + result.stderr, "not on 2 ranks"
    one_cwd, one = runs["python"]
    assert one.returncode == 0, one.stderr[-3000:]
    assert_parity(load_file(str(cwd / "img.latents.safetensors"))["latents"],
                  load_file(str(one_cwd / "img.latents.safetensors"))["latents"], atol=1e-5, rtol=1e-5, what="latents")
    written = sorted(p.name for p in cwd.iterdir() if p.is_file())
    assert written == ["img.json", "img.latents.safetensors", "img.png"]  # rank 0 alone writes, no stray files


@pytest.mark.parametrize("name", ["torchrun", "launch", "torchrun.sh"])
def test_multi_rank_launchers_match_one_process(runs, name):
    check_same_image_on_two_ranks(runs, name)


def test_the_launcher_check_fails_when_a_rank_keeps_its_partial_sum(runs):
    """Negative control: the same check on a torchrun.sh run whose row-parallel all-reduce returns each rank's own
    partial sum (tests/breaks) must fail, on the latents, although the run itself went through."""
    cwd, result = runs["torchrun.sh, all-reduce dropped"]
    assert result.returncode == 0 and "[tests/breaks] parallel.comm broken" in result.stderr, result.stderr[-3000:]
    with pytest.raises(AssertionError, match="latents"):
        check_same_image_on_two_ranks(runs, "torchrun.sh, all-reduce dropped")


def test_the_launcher_check_fails_when_one_rank_runs_alone(runs):
    """Negative control: a launcher that started one process gives the one-process latents; the check still
    fails, on the layout line."""
    cwd, result = runs["torchrun.sh, one rank started"]
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(AssertionError, match="not on 2 ranks"):
        check_same_image_on_two_ranks(runs, "torchrun.sh, one rank started")


def test_torchrun_sh_exits_with_the_documented_status_and_one_line(tmp_path, tiny_cache):
    """3 ranks for a DiT of 8 heads: every rank refuses it (status 2). Bare torchrun would exit 1 and add its
    ~40-line ChildFailedError report; the launcher script gives 2 and rank 0's line alone."""
    result = subprocess.run(["bash", str(LAUNCH_SH), *ARGS, "save_path=img.mp4"], cwd=tmp_path,
                            env=_env(tiny_cache, NPROC_PER_NODE="3"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == ["error: tensor-parallel degree 3 does not divide the DiT (heads=8, ff_dim=256, "
                     "model_dim=128); allowed degrees: [1, 2, 4, 8]"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("codes, expected", [
    ({}, (0, None)),
    ({0: 2, 1: 2, 2: 2}, (2, None)),  # every rank refused the input; rank 0 printed the line
    ({0: -15, 1: 2, 2: 2}, (2, None)),  # rank 0 printed, then the launcher's SIGTERM overtook its exit
    ({0: 3, 1: -9}, (3, None)),  # rank 0 named the killed rank itself
    ({0: -15, 1: -9}, (3, "rank 1 was killed by SIGKILL")),
    ({0: -15, 1: 139}, (3, "rank 1 exited with status 139 (a crash: its output is above)")),
    ({0: 143, 1: -15}, (143, None)),  # the job was stopped
    ({0: -15}, (143, None)),
    ({4: 3, 5: -15}, (3, None)),  # a node without rank 0 fails as its ranks did (node 0 may be the one lost)
    ({4: -15, 5: -15}, (0, None)),  # stopped by its launcher: rank 0's node reports the job
    ({4: -6}, (3, "rank 4 was killed by SIGABRT")),
])
def test_job_status_prefers_rank_0s_documented_status(codes, expected):
    from launch.torchrun import job_status
    assert job_status(codes) == expected


def test_vae_parallel_false_from_the_cli(runs):
    """`vae.parallel=false` on the command line (2 ranks under torch.distributed.launch): the run takes it (its
    sidecar records it; tests/test_vae_parallel.py shows the key reaching the rank's pipeline) and gives the one
    process's image."""
    check_same_image_on_two_ranks(runs, "launch")
    cwd, _ = runs["launch"]
    assert json.loads((cwd / "img.json").read_text())["config"]["vae"]["parallel"] is False
    assert json.loads((runs["torchrun"][0] / "img.json").read_text())["config"]["vae"]["parallel"] is True


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_nproc_per_node_is_refused_by_the_script(tmp_path, tiny_cache, value):
    result = subprocess.run(["bash", str(LAUNCH_SH), *ARGS, "save_path=img.mp4"], cwd=tmp_path,
                            env=_env(tiny_cache, NPROC_PER_NODE=value), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"launch/torchrun.sh: NPROC_PER_NODE must be a positive integer, got '{value}'"
    assert list(tmp_path.iterdir()) == []
