"""Which rank failed: heartbeats and error reports through the launcher's key-value store
(docs/parallel.md "Fault model").

When one rank dies, hangs or raises, the others only see a broken or timed-out
collective, which does not say who is at fault. So every rank of a multi-rank run
  - bumps a heartbeat counter in the store once a second from a daemon thread,
  - records what it is doing (`mark("prompt 3")`) from the main thread,
  - reports its own exception (`report(err)`) before it exits: a broken collective and a
    stop signal (Ctrl-C, SIGTERM) are symptoms, anything else is an error.
After a failure rank 0 reads all of it (`explain`) and names the culprit:
  - a rank that reported an error other than a broken collective raised it,
  - a rank that reported a stop signal was interrupted (named only when nothing else is),
  - a rank that reported the broken collective too is a bystander, not named,
  - a rank that reported nothing and whose heartbeat stopped died (killed, crashed, or frozen),
  - a rank that reported nothing and is alive is hung outside the collective.

The store is the one the launcher set up at MASTER_ADDR:MASTER_PORT (torchrun's agent
store, which outlives its workers; with plain env:// rendezvous rank 0 hosts it). Each
thread opens its own client, and every store call is guarded: diagnostics must never
turn a failure into a hang.
"""
import logging
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("k4flash")
HEARTBEAT_INTERVAL_S = 1.0
STORE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 0.5  # the most RankHealth.stop() waits for the heartbeat thread: far less than a store timeout


def is_collective_failure(err: BaseException) -> bool:
    """A broken or timed-out collective: the symptom of another rank's failure, not a cause."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    # gloo reports a dead peer or a timeout as RuntimeError on some code paths.
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                      "Broken pipe", "gloo"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= 300 else line[:297] + "..."


def _connect():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)


class RankHealth:
    def __init__(self, rank: int, world_size: int, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        # One namespace per launch attempt: torchrun restarts and SLURM requeues start clean.
        run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("SLURM_JOB_ID", "run"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.prefix = f"k4flash/{run}/{attempt}/"
        self._stop = threading.Event()
        self._store = None  # the main thread's client
        self._thread = None

    @classmethod
    def start(cls, rank: int, world_size: int, interval_s: float = HEARTBEAT_INTERVAL_S):
        health = cls(rank, world_size, interval_s)
        try:
            health._store = _connect()
        except Exception as err:  # no reachable store: run without diagnostics rather than fail
            log.warning("rank %d: no heartbeat store (%s); failures will not name the rank", rank, _first_line(err))
            return health
        health._thread = threading.Thread(target=health._beat, name="k4flash-heartbeat", daemon=True)
        health._thread.start()
        return health

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}{kind}/{rank}"

    def _beat(self):
        try:
            store = _connect()
            while not self._stop.is_set():
                store.add(self._key("beat", self.rank), 1)
                self._stop.wait(self.interval_s)
        except Exception:  # the store went away (its host died): nothing left to report to
            return

    def _set(self, kind: str, value: str) -> None:
        if self._store is None:
            return
        try:
            self._store.set(self._key(kind, self.rank), value)
        except Exception:
            pass

    def _get(self, kind: str, rank: int):
        try:
            key = self._key(kind, rank)
            return self._store.get(key).decode() if self._store.check([key]) else None
        except Exception:
            return None

    def _beats(self, rank: int):
        try:
            return self._store.add(self._key("beat", rank), 0)
        except Exception:
            return None

    def mark(self, stage: str) -> None:
        """What this rank is doing now (named in the failure report)."""
        self._set("stage", stage)

    def report(self, err: BaseException) -> None:
        """Record this rank's failure: a cause (an error), or a symptom (a broken collective, a stop signal)."""
        if not isinstance(err, Exception):  # KeyboardInterrupt, SIGTERM
            kind = "stopped"
        else:
            kind = "collective" if is_collective_failure(err) else "error"
        self._set(kind, _first_line(err))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """End the heartbeats. The thread wakes at once from its wait between beats and is joined, so no
        store call of it races the process group's teardown or the exit; one that is stuck in a store
        call (up to STORE_TIMEOUT_S when the store host is gone) is left behind after timeout_s: it is
        a daemon, and the exit does not wait for it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def explain(self, err: BaseException) -> str:
        """Rank 0's one-line account of a multi-rank failure, naming the rank(s) at fault."""
        own = f"rank {self.rank} saw {_first_line(err)}"
        if self._store is None:
            return own
        others = [r for r in range(self.world_size) if r != self.rank]
        before = {r: self._beats(r) for r in others}
        # Wait long enough for 2-3 heartbeats, and for the other ranks to report their own errors.
        time.sleep(2.5 * self.interval_s)
        after = {r: self._beats(r) for r in others}
        causes, stopped_ranks = [], []
        for r in others:
            stage = self._get("stage", r)
            where = f" during {stage}" if stage else ""
            error, stopped = self._get("error", r), self._get("stopped", r)
            if error is not None:
                causes.append(f"rank {r} failed{where}: {error}")
            elif stopped is not None:
                stopped_ranks.append(f"rank {r} was stopped{where} ({stopped})")
            elif self._get("collective", r) is not None:
                continue  # it saw the same broken collective (and may have exited since): a symptom
            elif after[r] is None or after[r] == before[r]:
                causes.append(f"rank {r} died or froze{where} (no heartbeat for {2.5 * self.interval_s:.1f} s)")
            else:
                causes.append(f"rank {r} is hung{where} (alive, but it never joined the collective)")
        # A launcher stopping the survivors of a death is not a cause: name stops only when alone.
        causes = causes or stopped_ranks
        if not causes:
            return f"{own}; no other rank reported a cause"
        return "; ".join(causes) + f" ({own})"
