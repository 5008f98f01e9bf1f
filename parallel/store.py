"""The one key-value protocol over the launcher's store (docs/parallel.md "Fault model").

torchrun's agent runs a TCPStore at MASTER_ADDR:MASTER_PORT that outlives its workers. Everything
the ranks tell each other outside the process group goes through it: heartbeats and verdicts
(parallel/health.py), the weights download (parallel/fetch.py) and a server's jobs, progress and
results (launch/serve.py). Each of them talks through a `RunStore`: one namespace of this launch
attempt's keys, `k4flash/<run id>/<restart>/<namespace>/<key>`, whose values are text. A torchrun
restart or a SLURM requeue gets a new attempt, so it starts clean. In one process, with no
launcher, `RunStore.local` keeps the same calls in a dict.
"""
import os
import threading
import time
from datetime import timedelta

STORE_TIMEOUT_S = 5.0


def run_prefix() -> str:
    """One key namespace per launch attempt: torchrun restarts and SLURM requeues start clean."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("SLURM_JOB_ID", "run"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
    return f"k4flash/{run}/{attempt}/"


def connect(timeout_s: float = STORE_TIMEOUT_S):
    """A new client of the launcher's store (MASTER_ADDR:MASTER_PORT); each thread that talks needs its own."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class LocalStore:
    """The four store calls the protocol makes (set, get, check, add), in one process."""

    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value if isinstance(value, bytes) else str(value).encode()

    def get(self, key):
        with self.lock:
            return self.data[key]

    def check(self, keys):
        with self.lock:
            return all(k in self.data for k in keys)

    def add(self, key, amount):
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value


class RunStore:
    """One namespace of this launch attempt's keys in a store (the launcher's, or a LocalStore)."""

    def __init__(self, store, namespace: str, prefix: str = None):
        self.store = store
        self.prefix = f"{run_prefix() if prefix is None else prefix}{namespace}/"

    @classmethod
    def launcher(cls, namespace: str, timeout_s: float = STORE_TIMEOUT_S) -> "RunStore":
        return cls(connect(timeout_s), namespace)

    @classmethod
    def local(cls, namespace: str) -> "RunStore":
        return cls(LocalStore(), namespace)

    def key(self, name: str) -> str:
        return self.prefix + name

    def set(self, name: str, value: str) -> None:
        self.store.set(self.key(name), value)

    def has(self, name: str) -> bool:
        return self.store.check([self.key(name)])

    def get(self, name: str):
        """The value, or None while the key is not set."""
        key = self.key(name)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def add(self, name: str, amount: int = 1) -> int:
        """Atomically add to a counter (missing: 0) and return its new value; add(name, 0) reads it."""
        return int(self.store.add(self.key(name), amount))

    def wait(self, name: str, poll_s: float, timeout_s: float = None) -> str:
        """The value once it is set, polled every poll_s (not store.wait: its timeout is the client's, which
        is kept short so that a dead store host fails a call quickly); TimeoutError after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.has(name):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.key(name)} was not set within {timeout_s:.0f} s")
            time.sleep(poll_s)
        return self.get(name)
