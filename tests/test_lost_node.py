"""A whole node lost mid-batch, as a node failure looks: two launchers on loopback (`--nnodes 2`, 2 ranks each, TP
inside a node, data parallel across), one of them killed with its whole process group (agent and ranks).

- Node 1 lost: node 0 ends within 60 s with status 3 and one `error:` line naming ranks 2 and 3 and node 1;
  nothing partial is left; a re-run of both nodes redoes only the prompts that were not finished.
- Node 0 lost (it hosts the store): node 1 ends in bounded time with status 3 and its own line, not a hang.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.spawn import free_port
from test_cli import ENTRY

pytestmark = pytest.mark.slow  # two launchers of two ranks each

PROMPTS = [f"prompt number {i}" for i in range(8)]  # dp 2: group 0 (node 0) takes the even ones, group 1 the odd
BOUND_S = 60


def _launch(cwd, tiny_cache, node, port, *overrides):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ENTRY.parent))
    command = [sys.executable, "-m", "launch.torchrun", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), str(ENTRY),
               "model=tiny", "prompts_file=prompts.txt", "output_dir=out", "time_length=0", "width=512",
               "height=512", "parallel.tp=2", "progress=false", *overrides]
    log = open(Path(cwd) / f"node{node}-{port}.log", "w+")
    # Its own session: killing its process group kills the agent and its ranks, as a lost machine would.
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def _output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def _finished(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} if out.exists() else {}


def _both_nodes(tmp_path, tiny_cache):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    port = free_port()
    return port, [_launch(tmp_path, tiny_cache, node, port) for node in (0, 1)]


def _descendants(pid: int) -> list:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(process) -> float:
    """The agent and its ranks at once (torchrun starts each rank in a session of its own)."""
    ranks = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return time.monotonic()


def _wait_for(path_glob, out: Path, nodes, timeout=240):
    deadline = time.monotonic() + timeout
    while not list(out.glob(path_glob)):
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in nodes), \
            [_output(log)[-2000:] for _, log in nodes]
        time.sleep(0.05)


def _lose(tmp_path, tiny_cache, node: int, written: str):
    """Both nodes on a batch; once `written` is in out/, node `node` is killed whole. Returns the survivor's
    (status, seconds from the fault to its exit, its `error:` lines, its output) and the store's port."""
    port, nodes = _both_nodes(tmp_path, tiny_cache)
    survivor = nodes[1 - node]
    try:
        _wait_for(written, tmp_path / "out", nodes)
        fault = _kill_node(nodes[node][0])
        status = survivor[0].wait(timeout=BOUND_S + 30)
        after_s = time.monotonic() - fault
    finally:
        _stop(nodes)
    text = _output(survivor[1])
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    print(f"\nnode {node} lost: node {1 - node} exit {status} {after_s:.1f} s after the fault: {errors}")
    return status, after_s, errors, text, port


def _stop(nodes):
    for process, _ in nodes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_node_1_lost_is_named_by_node_0_and_a_rerun_redoes_only_the_rest(tmp_path, tiny_cache):
    out = tmp_path / "out"
    # Node 1's first video is written: it goes on to its next, and is lost mid-video.
    status, after_s, errors, text, _ = _lose(tmp_path, tiny_cache, 1, "00001-*.json")
    assert status == 3 and after_s < BOUND_S, (status, after_s, text[-3000:])
    assert len(errors) == 1 and re.search(
        r"^error: distributed run failed: ranks 2, 3 on node 1 \(.+\) died or froze.* the node is lost", errors[0]), \
        text[-3000:]
    assert "rank 0 " not in errors[0] and "rank 1 " not in errors[0]  # node 0's ranks are no culprits
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix not in (".png", ".json")]
    assert leftovers == []  # nothing half-written (no temp file, no video without its sidecar)
    assert {p.stem for p in out.glob("*.png")} == {p.stem for p in out.glob("*.json")}
    finished = _finished(out)
    assert 1 <= len(finished) < len(PROMPTS)

    # Both nodes again: only what was not finished is made; what was is not touched.
    port, nodes = _both_nodes(tmp_path, tiny_cache)
    try:
        statuses = [process.wait(timeout=300) for process, _ in nodes]
    finally:
        _stop(nodes)
    assert statuses == [0, 0], [_output(log)[-2000:] for _, log in nodes]
    again = _finished(out)
    assert len(again) == len(PROMPTS) and all(again[name] == mtime for name, mtime in finished.items())


def test_node_0_lost_with_the_store_ends_node_1_with_its_own_line(tmp_path, tiny_cache):
    status, after_s, errors, text, port = _lose(tmp_path, tiny_cache, 0, "00000-*.json")
    assert status == 3 and after_s < BOUND_S, (status, after_s, text[-3000:])
    assert len(errors) == 1 and errors[0].startswith(
        f"error: distributed run failed: the job's store at 127.0.0.1:{port} (node 0's launcher) stopped "
        "answering: node 0 is lost or its launcher died; node 1 stops too"), text[-3000:]


def test_ranks_of_a_killed_launcher_stop_instead_of_living_on(tmp_path, tiny_cache):
    """SIGKILL to the torchrun agent alone (an OOM killer's pick, a mistaken kill): its ranks, each in a session of
    its own, would run on as orphans holding their GPUs; they see their launcher gone and stop within seconds,
    leaving nothing half-written."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ENTRY.parent))
    log = open(tmp_path / "node.log", "w+")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", "2", str(ENTRY), "model=tiny",
         "prompts_file=prompts.txt", "output_dir=out", "time_length=0", "width=512", "height=512", "parallel.tp=2",
         "progress=false"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        _wait_for("00000-*.json", out, [(launcher, log)])
        ranks = _descendants(launcher.pid)
        assert len(ranks) >= 2, ranks
        launcher.kill()
        killed = time.monotonic()
        while any(Path(f"/proc/{pid}").exists() and _running(pid) for pid in ranks):
            assert time.monotonic() - killed < 20, _output(log)[-3000:]
            time.sleep(0.1)
        print(f"\nlauncher killed: its ranks ended {time.monotonic() - killed:.1f} s later")
    finally:
        for pid in _descendants(launcher.pid) + [launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp file left


def _running(pid: int) -> bool:
    """Not exited (a zombie, exited but not reaped, counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
