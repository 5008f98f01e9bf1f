"""A k4flash server process on loopback, started, waited for, talked to, stopped: bench.serve's harness, which
the server tests use too."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from parallel.spawn import free_port

ENTRY = Path(__file__).resolve().parents[1] / "run_inference_distil.py"
KEY = "test-key"


def server_env(tiny_cache):
    env = dict(os.environ, K4FLASH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("K4FLASH_API_KEY", None)
    return env


class Server:
    """A server process on loopback: started, waited for, talked to, stopped."""

    def __init__(self, cwd, tiny_cache, world, *overrides, launcher="torch.distributed.run", model="tiny", env=None,
                 host="127.0.0.1"):
        """env: more environment variables for the server (the rest: server_env's); host: its serve.host (a
        loopback address); launcher: a module run as `python -m`, or "torchrun.sh" (launch/torchrun.sh)."""
        self.port, self.master_port, self.world, self.host = free_port(), free_port(), world, host
        self.output_dir = Path(cwd) / "served"
        command = [sys.executable, "-m", launcher, "--nproc-per-node", str(world), "--master-port",
                   str(self.master_port), str(ENTRY)] if world > 1 else [sys.executable, str(ENTRY)]
        if launcher == "torchrun.sh":
            command = ["bash", str(ENTRY.parent / "launch" / "torchrun.sh")]
            env = dict(env or {}, NPROC_PER_NODE=str(world))
        self.log = open(Path(cwd) / f"server-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [*command, f"model={model}", "mode=serve", f"serve.host={host}", f"serve.port={self.port}",
             f"serve.output_dir={self.output_dir}", "serve.save_latents=true", "progress=false", *overrides],
            cwd=cwd, env={**server_env(tiny_cache), **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while self.status("/health")[0] != 200:
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def request(self, method, path, body=None, headers=None, key=KEY, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), response.headers  # case-insensitive .get
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers
        except (urllib.error.URLError, ConnectionError):
            return None, b"", {}

    def status(self, path, **kw):
        status, body, _ = self.request("GET", path, **kw)
        return status, body

    def client(self):
        import openai
        return openai.OpenAI(api_key=KEY, base_url=f"http://{self.host}:{self.port}/v1", max_retries=0)

    def wait(self, video_id, statuses=("completed", "failed"), timeout=120, key=KEY):
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.status(f"/v1/videos/{video_id}", key=key)
            record = json.loads(body)
            if record["status"] in statuses:
                return record
            assert time.monotonic() < deadline, (record, self.output())
            time.sleep(0.1)

    def records_path(self, video_id):
        return self.output_dir / f"{video_id}.record.json"

    def ranks(self):
        """pid of each rank (found in /proc by its RANK and its serve.port on the command line)."""
        pids = {}
        for proc in Path("/proc").iterdir():
            try:
                environ = dict(v.split("=", 1) for v in (proc / "environ").read_bytes().decode().split("\0") if "=" in v)
                command = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, ValueError):
                continue
            if "RANK" in environ and f"serve.port={self.port}" in command and \
                    any("run_inference_distil" in word for word in command):
                pids[int(environ["RANK"])] = int(proc.name)
        return pids

    def stop(self, timeout=90):
        if self.process.poll() is None:
            # as SLURM signals every task of the step: each rank (the launcher is left to see them exit)
            for pid in (self.ranks().values() if self.world > 1 else [self.process.pid]):
                os.kill(pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        self.log.close()
        return self.process.returncode
