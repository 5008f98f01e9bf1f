"""Which rank failed, decided by a heartbeat thread that does not need a collective to raise
(docs/parallel.md "Fault model").

Under NCCL a collective is queued on the GPU and returns at once; when a peer dies, the host
blocks at the next sync inside a C call, where no `except` clause and no Python signal
handler runs. So every rank of a multi-rank run has a daemon thread that, once a second,
  - bumps its heartbeat counter in the launcher's key-value store and publishes how many
    collectives it has entered on each process group (parallel.comm.PROGRESS);
  - watches the peers it shares a process group with (rank 0 watches every rank):
      a peer that reported an error          → "rank r failed during <stage>: <error>"
      a peer whose heartbeat stopped          → "rank r died or froze during <stage>" (within DEAD_AFTER_S)
      a live peer whose collective count on a
      shared group stays below another's      → "rank r is hung during <stage> (alive, but it never joined
                                                 the collective)" (after parallel.timeout_s)
    and publishes the first such verdict;
  - notices SIGTERM / SIGINT through `signal.set_wakeup_fd` (the C-level handler writes to a pipe
    that the thread selects on, even while the main thread is stuck in native code), and if the
    main thread has not unwound within GRACE_S, stops the process itself.
Acting on a verdict, every rank removes its half-written outputs, rank 0 prints the one `error:`
line, and each exits with status 3 (os._exit: the main thread may never come back). A failure
the main thread sees first (gloo raises at once on a dead peer) takes the ordinary path instead:
`claim()` decides which of the two reports, so exactly one does.

The store is the launcher's (parallel/store.py, namespace `health`). Each thread has its own
client, and every store call is guarded: diagnostics must never turn a failure into a hang.
"""
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from . import comm
from .status import SIGNAL_STATUS, ExitStatus
from .store import STORE_TIMEOUT_S, RunStore
from .verdicts import DEAD_AFTER_S, SYMPTOMS, PeerWatch, Records

log = logging.getLogger("k4flash")
HEARTBEAT_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 0.5  # the most RankHealth.stop() waits for the heartbeat thread: far less than a store timeout
# No answer from the store for this long: its host is gone (two store timeouts, so one slow call on a loaded machine
# is not taken for a lost node).
STORE_LOST_AFTER_S = 2 * STORE_TIMEOUT_S
GRACE_S = 3.0  # after SIGTERM / SIGINT, how long the main thread has to unwind before the thread exits for it


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


class RankHealth:
    def __init__(self, rank: int, world_size: int, interval_s: float = HEARTBEAT_INTERVAL_S,
                 timeout_s: float = 600.0, watch=None, on_exit=None, grace_s: float = GRACE_S):
        self.rank, self.world_size, self.interval_s, self.timeout_s = rank, world_size, interval_s, timeout_s
        # After SIGTERM / SIGINT, how long the main thread may take to finish on its own (a server drains).
        self.grace_s = grace_s
        self.failed = threading.Event()  # set once this thread has a verdict and is ending the process
        # The ranks this one watches: rank 0 all of them, the others their process groups' members (set by
        # the caller once the mesh exists) and rank 0.
        self.watch = PeerWatch(rank, sorted(set(watch if watch is not None else range(world_size)) - {rank}),
                               timeout_s)
        self.on_exit = on_exit  # called just before the thread ends the process (remove partial outputs)
        self._stop = threading.Event()
        self._claim = threading.Lock()
        self._claimed = False
        self._store_lost = threading.Event()  # the main thread found the store gone (claim)
        # The torchrun agent that started this rank (None outside torchrun): watched, as its death orphans the rank.
        self._launcher_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._store = None  # the main thread's client
        self._records = Records(None)  # its health records
        self._thread = None
        self._wakeup = None  # (read fd, write fd) of the signal pipe
        self._previous_wakeup_fd = None

    @classmethod
    def start(cls, rank: int, world_size: int, interval_s: float = HEARTBEAT_INTERVAL_S, **options):
        health = cls(rank, world_size, interval_s, **options)
        try:
            health._store = RunStore.launcher("health")
            health._records = Records(health._store)
        except Exception as err:  # no reachable store: run without diagnostics rather than fail
            log.warning("rank %d: no heartbeat store (%s); failures will not name the rank", rank, _first_line(err))
            return health
        # Which node this rank is on, named when a whole node is lost (torchrun's GROUP_RANK is the node's rank).
        health._set("node", json.dumps({"node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname(),
                                        "pid": os.getpid()}))
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            health._wakeup = (read_fd, write_fd)
            health._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        health._thread = threading.Thread(target=health._run, name="k4flash-heartbeat", daemon=True)
        health._thread.start()
        return health

    # -- the main thread's side -------------------------------------------------------------------------

    def _set(self, kind: str, value: str) -> None:
        self._records.set(kind, self.rank, value)

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

    def claim(self) -> bool:
        """Take the failure report for the main thread; False when the heartbeat thread already acts on one
        (it ends the process itself: the caller should just wait). Also False on a rank other than 0 whose store
        no longer answers: node 0, and rank 0 with it, may be gone, so the heartbeat thread ends the process
        with this node's own line."""
        if self.rank != 0 and self._store is not None and not self._store_answers():
            self._store_lost.set()
            return False
        return self._take_claim()

    def _store_answers(self) -> bool:
        try:
            self._store.add("probe", 0)
            return True
        except Exception:
            return False

    def _take_claim(self) -> bool:
        with self._claim:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, done: bool = True) -> None:
        """End the heartbeats (`done`: this rank finished, so its silence is no death). The thread wakes at once
        and is joined, so none of its store calls races the process group's teardown or the exit; one stuck in a
        store call (up to STORE_TIMEOUT_S when the store host is gone) is left behind: it is a daemon."""
        if done:
            self._set("done", "1")
        self._stop.set()
        if self._wakeup is not None:
            with contextlib.suppress(OSError):
                os.write(self._wakeup[1], b"\0")  # wake the select at once
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            for fd in self._wakeup:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wakeup = None

    def total(self, value: int) -> int:
        """The sum of `value` over every rank, through the store rather than a collective: a rank that is done
        waits for the others without a timeout (data-parallel groups may finish hours apart), and its
        heartbeat thread keeps watching while it waits."""
        store = self._store
        store.add("total", int(value))
        store.add("total-count", 1)
        while store.add("total-count", 0) < self.world_size:
            time.sleep(0.05)
        return store.add("total", 0)

    def explain(self, err: BaseException) -> str:
        """Rank 0's one-line account of a failure the main thread saw, naming the rank(s) at fault."""
        own = f"rank {self.rank} saw {_first_line(err)}"
        if self._store is None:
            return own
        records = self._records
        others = [r for r in range(self.world_size) if r != self.rank]
        before = {r: records.beats(r) for r in others}
        silent_s, silent = self._await_records(others, before)
        causes, stopped_ranks = [], []
        for r in others:
            where = records.where(r)
            error, stopped = records.get("error", r), records.get("stopped", r)
            if error is not None:
                causes.append(f"rank {r} failed{where}: {error}")
            elif stopped is not None:
                stopped_ranks.append(f"rank {r} was stopped{where} ({stopped})")
            elif r in silent:
                # Silent for the whole wait, as seen by reads that answered. Not judged from a read made now: on a
                # loaded machine a store call can time out, and an unanswered read is no proof of a death.
                causes.append(f"rank {r} died or froze{where} (no heartbeat for {silent_s:.1f} s)")
            elif records.any_of(SYMPTOMS, r) or r in silent.unknown:
                continue  # it saw the same broken collective or acted on a verdict (and may have exited): a symptom
            else:
                causes.append(f"rank {r} is hung{where} (alive, but it never joined the collective)")
        # A launcher stopping the survivors of a death is not a cause: name stops only when alone.
        causes = causes or stopped_ranks
        if not causes:
            return f"{own}; no other rank reported a cause"
        return "; ".join(causes) + f" ({own})"

    def _await_records(self, others, before: dict):
        """Wait for the other ranks' own records (an error, a stop, a symptom) or a new heartbeat: at least
        2.5 beats, so that their reports can arrive; at most DEAD_AFTER_S, so that only a rank silent as long as
        the heartbeat thread's own verdict needs is called dead (a late beat on a loaded machine is no death).
        Returns (how long the wait was, Silent: the ranks no answered read ever showed alive or reporting; its
        `unknown`: those of them whose reads went unanswered at the end, which are named as nothing)."""
        started, alive = time.monotonic(), set()
        while True:
            waited = time.monotonic() - started
            silent = Silent()
            for r in others:
                if r in alive:
                    continue
                beats = self._records.beats(r)
                if beats is not None and before[r] is not None and beats != before[r]:
                    alive.add(r)  # it beat: alive, however late its next beat comes
                elif self._records.any_of((*SYMPTOMS, "error", "stopped"), r):
                    alive.add(r)  # it reported: its record, not its heartbeat, says what it is
                elif beats is None or before[r] is None:
                    silent.unknown.add(r)
                else:
                    silent.add(r)
            if waited >= DEAD_AFTER_S or (waited >= 2.5 * self.interval_s and not silent and not silent.unknown):
                return waited, silent
            time.sleep(0.25 * self.interval_s)

    # -- the heartbeat thread -------------------------------------------------------------------------------

    def _run(self):
        try:
            store = RunStore.launcher("health")
        except Exception:  # the store went away (its host died): nothing left to report to
            return
        records = Records(store)
        signal_seen, answered = None, time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                store.add(f"beat/{self.rank}", 1)
                store.set(f"entered/{self.rank}", json.dumps(_progress()))
                answered = time.monotonic()
            if time.monotonic() - answered > STORE_LOST_AFTER_S or self._store_lost.is_set():
                self._exit(store_lost_message(), ExitStatus.DISTRIBUTED, speaker="node")
            if self._launcher_pid is not None and os.getppid() != self._launcher_pid:
                # torchrun starts each rank in a session of its own: a SIGKILLed agent leaves its ranks running,
                # orphans holding GPUs; a rank whose launcher is gone stops instead.
                self._exit(f"this node's launcher (pid {self._launcher_pid}) is gone: killed, or its node lost; "
                           f"rank {self.rank} stops", ExitStatus.DISTRIBUTED, speaker="node")
            signum = self._wait_for_signal()
            if signum is not None and signal_seen is None:
                signal_seen = (signum, time.monotonic(), self.watch.beats())
            if self._stop.is_set():
                return
            try:
                if signal_seen is not None and time.monotonic() - signal_seen[1] > self.grace_s:
                    self._exit_on_signal(*signal_seen, store)
                verdict = self._published_verdict(store)
                if verdict is None:
                    verdict = self.watch.judge(records, _progress())
                    if verdict is not None:
                        verdict = self._publish(store, verdict)
                if verdict is not None:
                    self._exit(verdict, ExitStatus.DISTRIBUTED, store)
            except Exception as err:  # a diagnostic must never stop watching (nor raise into the process)
                log.debug("rank %d heartbeat: %s", self.rank, _first_line(err))

    def _wait_for_signal(self):
        """Sleep one interval, or less when a signal arrives; the signal's number, or None."""
        if self._wakeup is None:
            self._stop.wait(self.interval_s)
            return None
        ready, _, _ = select.select([self._wakeup[0]], [], [], self.interval_s)
        if not ready:
            return None
        with contextlib.suppress(OSError):
            data = os.read(self._wakeup[0], 64)
            numbers = [n for n in data if n in SIGNAL_STATUS]
            return numbers[0] if numbers else None
        return None

    def _published_verdict(self, store):
        with contextlib.suppress(Exception):
            return store.get("verdict")
        return None

    def _publish(self, store, verdict: str) -> str:
        """The first verdict published wins (one rank's view, not two conflicting ones)."""
        with contextlib.suppress(Exception):
            if store.add("verdict-claim", 1) == 1:
                store.set("verdict", verdict)
                return verdict
            return store.wait("verdict", 0.05, STORE_TIMEOUT_S)
        return verdict

    def _exit_on_signal(self, signum, signalled_at, beats_at_signal, store):
        """The main thread did not unwind after SIGTERM / SIGINT (it is stuck in native code): exit for it,
        naming a rank at fault when rank 0 knows one (the launcher stops the survivors of a death). Called once a
        beat from GRACE_S after the signal on; returns while it cannot tell yet."""
        records = Records(store)
        verdict = self._published_verdict(store) or self.watch.judge(records, _progress())
        if verdict is not None:
            self._exit(verdict, ExitStatus.DISTRIBUTED, store)
        # A launcher stops the survivors of a rank's death at once, so that rank is likely among the peers silent
        # since the signal. A peer is alive once it has beaten twice since then (a dying rank's last beat can still
        # be seen after the signal, never two); one that has not by DEAD_AFTER_S is the rank that died. A loaded
        # machine delays beats, which only delays the verdict.
        since_signal = time.monotonic() - signalled_at
        silent = self.watch.silent_since(beats_at_signal, records)
        if silent and since_signal < DEAD_AFTER_S:
            return
        if silent:
            self._exit(f"rank {silent[0]} died or froze{records.where(silent[0])} (no heartbeat since "
                       f"the launcher's {signal.Signals(signum).name}, {since_signal:.0f} s)", ExitStatus.DISTRIBUTED,
                       store)
        records.set("stopped", self.rank, f"received {signal.Signals(signum).name}")
        self._exit(f"terminated (received {signal.Signals(signum).name}); finished outputs are kept, "
                   f"re-run to resume", SIGNAL_STATUS[signum], prefix="")

    def alive(self) -> bool:
        """False once a rank this one watches has been unheard for QUIET_AFTER_S, or is found dead, hung or failed
        (a server's /health)."""
        return not (self.failed.is_set() or self.watch.quiet)

    def _exit(self, message: str, status: int, store=None, prefix: str = "distributed run failed: ", speaker="job"):
        """End the process on a verdict (or a signal): `store` given, this rank records that it left on the verdict,
        so that rank 0 does not take its silence for a death of its own. speaker: who prints the line, rank 0
        ("job"), or each node's first rank ("node": when the store is lost, rank 0 may be what was lost)."""
        self.failed.set()
        if not self._take_claim():
            return  # the main thread is reporting this failure itself
        if store is not None:
            Records(store).set("exited", self.rank, message)
        if self.rank == 0 or speaker == "node" and os.environ.get("LOCAL_RANK", "0") == "0":
            # One write: print() makes two under PYTHONUNBUFFERED, and another rank's output can land between them.
            sys.stderr.write(f"error: {prefix}{message}\n")
            sys.stderr.flush()
        if self.on_exit is not None:
            with contextlib.suppress(Exception):
                self.on_exit()
        _abort_process_group()
        os._exit(status)


def store_lost_message() -> str:
    """What a rank says when the launcher's store stopped answering it: the host that runs it is gone."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"the job's store at {where} (node 0's launcher) stopped answering: node 0 is lost or its launcher "
            f"died; node {os.environ.get('GROUP_RANK', '?')} stops too")


class Silent(set):
    """Ranks found silent; `unknown`: those whose store reads did not answer."""

    def __init__(self):
        super().__init__()
        self.unknown = set()


def _progress() -> dict:
    """This rank's collectives entered per group, JSON-ready; a copy, as the main thread adds to it meanwhile."""
    return {name: [ranks, count] for name, (ranks, count) in list(comm.PROGRESS.entered.items())}


def _abort_process_group(wait_s: float = 2.0) -> None:
    """Abort the communicators (NCCL frees them and stops its watchdog) without waiting on a dead peer."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not dist.is_initialized():
        return

    def try_abort():
        with contextlib.suppress(Exception):
            abort()

    thread = threading.Thread(target=try_abort, daemon=True)  # in case a backend's abort itself blocks
    thread.start()
    thread.join(wait_s)
