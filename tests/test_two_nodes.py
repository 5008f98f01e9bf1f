"""Two "nodes" on one machine, as CI can run them: two launchers (`python -m launch.torchrun --nnodes 2
--node-rank 0/1 --nproc-per-node 2`), each in a session of its own, 2 ranks each, rendezvous on loopback at
node 0's store (node 1 passes `--local-addr 127.0.0.2`, which torchrun's static rendezvous does not use). A tp=2 batch runs TP inside each node and data parallelism across the two, into one shared
output_dir, and resumes across them; a tp=2 server takes videos on both nodes' groups. Negative controls: both
launchers started as node 0 (refused in seconds, not a 600 s wait), a stray node-0 launcher beside a running
job (refused, the job unharmed), and the in-rank layout check (parallel/layout.py) on inconsistent claims."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench.server import ENTRY, KEY, Server, server_env
from parallel.layout import LayoutError, Place, check_layout, layout_problems
from parallel.spawn import free_port
from parallel.store import RunStore
from parity import assert_parity

pytestmark = pytest.mark.slow  # launchers: `-m "not slow"` leaves them out

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
SEED = 40  # a prompts file's line i gets seed SEED + i (launch/batch.py)
BATCH = ["model=tiny", "prompts_file=prompts.txt", "output_dir=out", f"seed={SEED}", "time_length=0", "width=512",
         "height=512", "progress=false", "save_latents=true", "parallel.tp=2"]
BOUND_S = 60  # a refused launch ends within this


class Nodes:
    """Two (or more) launchers of one job, each in a session of its own; output in cwd/node<i>.{out,err}."""

    def __init__(self, cwd, tiny_cache, overrides, node_ranks=(0, 1), master_port=None):
        self.cwd, self.master_port = Path(cwd), master_port or free_port()
        self.processes, self.files = [], []
        for i, node in enumerate(node_ranks):
            out, err = (open(self.cwd / f"node{i}.{kind}", "w+") for kind in ("out", "err"))
            self.files.append((out, err))
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "launch.torchrun", "--nnodes", "2", "--node-rank", str(node),
                 "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(self.master_port),
                 "--local-addr", f"127.0.0.{i + 1}", str(ENTRY), *overrides],
                cwd=cwd, env=server_env(tiny_cache), stdout=out, stderr=err, start_new_session=True))

    def output(self, i) -> tuple:
        """(stdout, stderr) of launcher i so far."""
        texts = []
        for f in self.files[i]:
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return tuple(texts)

    def wait(self, timeout) -> list:
        """Each launcher's exit status, all within `timeout` s together; one still running then is killed (and
        reported as "still running")."""
        deadline, statuses = time.monotonic() + timeout, []
        try:
            for p in self.processes:
                try:
                    statuses.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    statuses.append(f"still running after {timeout} s")
            return statuses
        finally:
            self.kill()

    def kill(self):
        for p in self.processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher; its ranks are in sessions of their own:
                p.wait()
        for pid in ranks_of(str(self.cwd)):  # ...found by the job's folder on their command line
            os.kill(pid, signal.SIGKILL)

    def report(self) -> str:
        return "\n".join(f"--- launcher {i}:\n{''.join(self.output(i))[-3000:]}" for i in range(len(self.processes)))


def ranks_of(marker: str) -> list:
    """The pids of k4flash ranks with `marker` in their command line or working directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "run_inference_distil" in command and "launch.torchrun" not in command and \
                (marker in command or cwd == marker):
            pids.append(int(proc.name))
    return pids


def outputs(folder: Path) -> dict:
    """{file name: mtime_ns} of the outputs in a folder."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def written_by(text: str) -> dict:
    """{prompt index: the rank whose 'wrote' line names it}: rank 0 logs plainly, another group's first rank as
    'rank N: wrote' (launch/generate.py)."""
    ranks = {}
    for line in text.splitlines():
        if "wrote out/" in line:
            index = int(line.split("wrote out/")[1][:5])
            ranks[index] = int(line.split("rank ")[1].split(":")[0]) if ": wrote" in line else 0
    return ranks


@pytest.fixture(scope="module")
def reference_latents(tiny_weights):
    """One process, the library's pipeline: the latents of prompts 0 and 1 (one per node's group) with their seeds,
    made as its generate() makes them, less the decode (the latents come before it)."""
    import torch

    from k4flash import get_T2V_pipeline
    from k4flash.geometry import latent_shape
    from k4flash.tiny import TINY_DIT_PARAMS

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = get_T2V_pipeline("cpu", cache_dir=tiny_weights, dit_params=TINY_DIT_PARAMS, download=False)
    with torch.no_grad():
        latents = {i: pipe.denoise(pipe.encode_text(PROMPTS[i]), latent_shape(0, 512, 512), SEED + i, progress=False)
                   for i in (0, 1)}
    torch.set_num_threads(previous)
    return latents


def test_a_tp2_batch_over_two_nodes_matches_one_process_and_resumes(tmp_path, tiny_cache, reference_latents):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    nodes = Nodes(tmp_path, tiny_cache, BATCH)
    assert nodes.wait(300) == [0, 0], nodes.report()
    node0, node1 = ("".join(nodes.output(i)) for i in (0, 1))
    assert "layout: 2 nodes x 2 ranks, node-major" in node0, node0[-3000:]
    # Each node's group-first rank (global 0 and 2) wrote its share, every second prompt, into the shared folder.
    assert (written_by(node0), written_by(node1)) == ({0: 0, 2: 0}, {1: 2, 3: 2}), nodes.report()
    names = [f"{i:05d}-{p.replace(' ', '-')}" for i, p in enumerate(PROMPTS)]
    for name in names:
        assert all((out / f"{name}{suffix}").is_file() for suffix in (".png", ".json", ".latents.safetensors")), name
    for i, want in reference_latents.items():
        got = load_file(str(out / f"{names[i]}.latents.safetensors"))["latents"]
        assert_parity(got, want, atol=1e-5, rtol=1e-5, what=f"latents of {names[i]}")
        assert json.loads((out / f"{names[i]}.json").read_text())["seed"] == SEED + i

    # Resume across the nodes: one prompt of each group lost; both nodes see the same two left and share them.
    first = outputs(out)
    lost = [names[1], names[2]]
    latents = {name: load_file(str(out / f"{name}.latents.safetensors"))["latents"] for name in lost}
    for name in lost:
        for path in out.glob(f"{name}.*"):
            path.unlink()
    again = Nodes(tmp_path, tiny_cache, BATCH)
    assert again.wait(300) == [0, 0], again.report()
    node0, node1 = ("".join(again.output(i)) for i in (0, 1))
    assert "resuming: 2 of 4 prompts already done" in node0 and "2 written, 2 skipped" in node0, node0[-3000:]
    assert (written_by(node0), written_by(node1)) == ({1: 0}, {2: 2}), again.report()  # todo [1, 2], dealt again
    now = outputs(out)
    assert set(now) == set(first) and not [p for p in now if p.startswith(".")]
    for name, mtime in first.items():
        assert (now[name] == mtime) != name.startswith(tuple(lost)), name  # only the lost prompts were redone
    for name, want in latents.items():
        assert_parity(load_file(str(out / f"{name}.latents.safetensors"))["latents"], want, atol=1e-5, rtol=1e-5,
                      what=f"resumed latents of {name}")


class TwoNodeServer(Server):
    """bench.server's harness on two launchers of 2 ranks each: rank 0 (node 0) listens."""

    def __init__(self, cwd, tiny_cache, *overrides):
        self.port, self.world, self.host = free_port(), 4, "127.0.0.1"
        self.output_dir = Path(cwd) / "served"
        self.nodes = Nodes(cwd, tiny_cache, ["model=tiny", "mode=serve", f"serve.host={self.host}",
                                             f"serve.port={self.port}", f"serve.output_dir={self.output_dir}",
                                             "serve.save_latents=true", "progress=false", *overrides])
        self.master_port = self.nodes.master_port
        deadline = time.monotonic() + 240
        while self.status("/health")[0] != 200:
            assert all(p.poll() is None for p in self.nodes.processes), self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.3)

    def output(self) -> str:
        return self.nodes.report()

    def stop(self, timeout=90):
        """SIGTERM every rank of both nodes, as SLURM signals every task; each launcher's exit status."""
        ranks = self.ranks()
        assert sorted(ranks) == [0, 1, 2, 3], ranks
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)
        return self.nodes.wait(timeout)


def test_a_tp2_server_over_two_nodes_uses_both_groups(tmp_path, tiny_cache):
    server = TwoNodeServer(tmp_path, tiny_cache, "parallel.tp=2", f"serve.api_key={KEY}")
    try:
        ids = [json.loads(server.request("POST", "/v1/videos", {"prompt": p, "seconds": 0, "size": "512x512",
                                                                "seed": SEED + i})[1])["id"]
               for i, p in enumerate(PROMPTS)]
        # Meanwhile a stray launcher started as node 0 of the same job: refused at once, the job unharmed.
        (tmp_path / "stray").mkdir()
        stray = Nodes(tmp_path / "stray", tiny_cache, ["model=tiny", "mode=serve"], node_ranks=(0,),
                      master_port=server.master_port)
        clock = time.monotonic()
        assert stray.wait(BOUND_S) == [2], stray.report()
        assert time.monotonic() - clock < BOUND_S
        errors = [line for line in stray.output(0)[1].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "two launchers both claim node 0" in errors[0], stray.report()
        time.sleep(1.5)  # 3 polls of the node-0 launcher's watch (parallel/layout.py), were it still watching
        assert [p.poll() for p in server.nodes.processes] == [None, None], server.output()

        records = [server.wait(i, timeout=240) for i in ids]
        assert [r["status"] for r in records] == ["completed"] * 4, records
        listed = {v["id"]: v["status"] for v in json.loads(server.status("/v1/videos")[1])["data"]}
        assert all(listed[i] == "completed" for i in ids), listed
        on_disk = {i: json.loads(server.records_path(i).read_text()) for i in ids}
        assert {r["rank"] for r in on_disk.values()} == {0, 2}, on_disk  # both nodes' groups made videos
        assert server.status("/health")[0] == 200
    except BaseException:
        server.nodes.kill()
        raise
    assert server.stop() == [0, 0], server.output()


def test_two_launchers_both_as_node_0_are_refused_in_seconds(tmp_path, tiny_cache):
    """Negative control: the second cannot host the store (its port is the first one's), the first would wait 600 s
    for a node 1: each ends with exit 2 and one `error:` line naming the problem, well within the bound."""
    clock = time.monotonic()
    nodes = Nodes(tmp_path, tiny_cache, ["model=tiny", "prompt=x", "time_length=0", "save_path=x.png"],
                  node_ranks=(0, 0))
    assert nodes.wait(BOUND_S) == [2, 2], nodes.report()
    elapsed = time.monotonic() - clock
    assert elapsed < BOUND_S, elapsed
    for i in (0, 1):
        stdout, stderr = nodes.output(i)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "two launchers both claim node 0 (--node-rank 0)" in errors[0], nodes.report()
        assert "Traceback" not in stderr and "loaded" not in stdout + stderr, nodes.report()
    assert not (tmp_path / "x.png").exists()


def _claim_all(places, store, timeout_s=10.0):
    """check_layout on a thread per rank process, one store: {index: Place or the LayoutError's message}."""
    results = {}

    def one(i, place):
        env = dict(RANK=str(place.rank), WORLD_SIZE=str(place.world), LOCAL_RANK=str(place.local_rank),
                   LOCAL_WORLD_SIZE=str(place.local_world), GROUP_RANK=str(place.node),
                   GROUP_WORLD_SIZE=str(place.nodes))
        try:
            results[i] = check_layout(2, timeout_s, environ=env, store=store)
        except LayoutError as err:
            results[i] = str(err)
    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(places)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _places(nodes=(0, 1), local_world=2, world=4):
    return [Place(node * local_world + k, world, k, local_world, node, 2, "host", 100 + 10 * i + k)
            for i, node in enumerate(nodes) for k in range(local_world)]


def test_the_rank_layout_check_refuses_a_node_started_twice_and_uneven_nodes(caplog):
    """The in-rank half (parallel/layout.py), on a store in memory: a consistent job passes; node 1 started twice
    (3 launchers, 6 processes) is refused on every process with one message; nodes of 2 and 1 ranks are refused
    by each rank alone; the layout's problems are named; rank 0 warns of a model group across nodes."""
    with caplog.at_level("WARNING", logger="k4flash"):
        check_layout(4, 1.0, environ=dict(RANK="0", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4"))  # tp 4 on nodes of 4
        assert not caplog.records
        check_layout(4, 1.0, environ=dict(RANK="0", WORLD_SIZE="8", LOCAL_WORLD_SIZE="2"))  # ...of 2: it spans
        check_layout(2, 1.0, environ=dict(RANK="0", WORLD_SIZE="6", LOCAL_WORLD_SIZE="3"))  # ranks 2-3 span 2 nodes
    assert [r.getMessage().split(" consecutive")[0] for r in caplog.records] == [
        "a model group (parallel.tp x parallel.ulysses = 4", "a model group (parallel.tp x parallel.ulysses = 2"]
    good = _claim_all(_places(), RunStore.local("layout"))
    assert all(isinstance(r, Place) for r in good.values()), good

    twice = _claim_all(_places((0, 1, 1)), RunStore.local("layout"))
    assert all(isinstance(r, str) and r.startswith("two launchers both claim node 1: its ranks 2-3 started twice")
               for r in twice.values()), twice

    uneven = _claim_all([Place(0, 3, 0, 2, 0, 2, "a", 1), Place(2, 3, 0, 1, 1, 2, "b", 2)], RunStore.local("l"))
    assert all("different numbers of ranks" in r for r in uneven.values()), uneven

    claims = {p.rank: [p] for p in _places()}
    assert layout_problems(claims, 4) == []
    del claims[3]
    assert layout_problems(claims, 4) == ["rank 3 never started"]
    moved = {p.rank: [Place(**{**p.__dict__, "host": "b" if p.rank == 3 else "a"})] for p in _places()}
    assert layout_problems(moved, 4) == ["node 1's ranks run on several hosts (a, b)"]
