"""What a rank can tell of its peers from their records in the run's store, and the verdicts it draws from them
(docs/parallel.md "Fault model"). Reads and judgements only: acting on a verdict is parallel/health.py's.

Each rank keeps its records in the store's `health` namespace, keyed `<kind>/<rank>`: `beat` (a counter),
`entered` (its collectives per process group), `stage`, and the ways it can end: `error` (a cause), `stopped`,
`collective` (it saw a broken collective), `done`, `exited` (it left on a published verdict).
"""
import contextlib
import json
import time

DEAD_AFTER_S = 6.0  # no heartbeat for this long: the rank died or is frozen (SIGSTOP, a machine gone)
QUIET_AFTER_S = 2.5  # no heartbeat for this long: not healthy (yet not a verdict)
SYMPTOMS = ("collective", "done", "exited")  # a rank that recorded one of these is no cause of its own


class Records:
    """The health records in one client's store, every call guarded: a failing store call reads as None and writes
    nothing, since diagnostics must never turn a failure into a hang."""

    def __init__(self, store):
        self.store = store

    def get(self, kind: str, rank: int):
        with contextlib.suppress(Exception):
            return self.store.get(f"{kind}/{rank}")
        return None

    def set(self, kind: str, rank: int, value: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"{kind}/{rank}", value)

    def beats(self, rank: int):
        with contextlib.suppress(Exception):
            return self.store.add(f"beat/{rank}", 0)
        return None

    def where(self, rank: int) -> str:
        """" during <stage>" as the rank last marked it, or nothing."""
        stage = self.get("stage", rank)
        return f" during {stage}" if stage else ""

    def node(self, rank: int):
        """{node, host, pid} as the rank recorded them at its start (parallel/health.py), or None."""
        value = self.get("node", rank)
        with contextlib.suppress(ValueError, TypeError):
            return json.loads(value)
        return None

    def any_of(self, kinds, rank: int) -> bool:
        return any(self.get(kind, rank) is not None for kind in kinds)


class _Peer:
    """What the watching thread last saw of one rank, and since when."""

    def __init__(self):
        self.beats, self.beat_seen = None, time.monotonic()
        self.counts = {}
        # Since when another member of a shared group is seen to have entered more collectives than this rank,
        # with no progress of its own meanwhile (None: it is not behind). A hang is timed from here, not from
        # the start: a rank that is still loading while its peers already wait is not hung until they have
        # waited parallel.timeout_s.
        self.behind_since = None


class PeerWatch:
    """The ranks one heartbeat thread watches, what it last saw of each, and the first fault among them."""

    def __init__(self, rank: int, watched, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.peers = {r: _Peer() for r in watched}
        self.quiet = False  # a watched rank has missed a few heartbeats

    def beats(self) -> dict:
        """The beat count last seen of each peer."""
        return {r: peer.beats for r, peer in self.peers.items()}

    def judge(self, records: Records, progress: dict, dead_after_s: float = DEAD_AFTER_S):
        """The first fault among the watched ranks as a one-line verdict, or None. progress: this rank's own
        collectives per group (parallel.comm.PROGRESS, as published)."""
        now = time.monotonic()
        counts, quiet, dead = {}, False, []
        for r, peer in self.peers.items():
            error = records.get("error", r)
            if error is not None:
                return f"rank {r} failed{records.where(r)}: {error}"
            if records.get("done", r) is not None:
                continue
            beats = records.beats(r)
            if beats is not None and beats != peer.beats:
                peer.beats, peer.beat_seen = beats, now
            # Unheard for a few beats: not yet a verdict, but no longer healthy (a server's /health says so).
            quiet = quiet or (peer.beats is not None and now - peer.beat_seen > QUIET_AFTER_S)
            self.quiet = quiet
            if peer.beats is not None and now - peer.beat_seen > dead_after_s:
                dead.append(r)
                continue
            entered = records.get("entered", r)
            if entered is not None:
                counts[r] = json.loads(entered)
                peer_counts = {name: count for name, (_, count) in counts[r].items()}
                if peer_counts != peer.counts:
                    peer.counts, peer.behind_since = peer_counts, None  # it moved: any wait starts again
        if dead:
            return self.death(records, dead, now)
        counts[self.rank] = progress
        for r, peer in self.peers.items():
            if r not in counts or not behind(r, counts):
                peer.behind_since = None
                continue
            peer.behind_since = peer.behind_since or now
            if now - peer.behind_since > self.timeout_s:
                return f"rank {r} is hung{records.where(r)} (alive, but it never joined the collective)"
        return None

    def death(self, records: Records, dead: list, now: float) -> str:
        """The verdict on ranks silent past DEAD_AFTER_S. When every rank of another node is silent (each past
        QUIET_AFTER_S: a node's ranks stop within a beat of each other), the node is named as lost, with all its
        ranks; otherwise only the ranks past DEAD_AFTER_S, one by one (a late beat is no death)."""
        nodes = {r: records.node(r) for r in [*self.peers, self.rank]}
        silent = {r for r, peer in self.peers.items() if peer.beats is not None and now - peer.beat_seen > QUIET_AFTER_S}
        lost = sorted({nodes[r]["node"] for r in dead if nodes[r] is not None})
        lost = [n for n in lost if n != (nodes[self.rank] or {}).get("node")
                and all(r in silent for r, info in nodes.items() if info is not None and info["node"] == n)]
        parts = []
        for n in lost:
            ranks = sorted(r for r, info in nodes.items() if info is not None and info["node"] == n)
            wheres = sorted({records.where(r) for r in ranks})
            parts.append(f"ranks {', '.join(map(str, ranks))} on node {n} ({nodes[ranks[0]]['host']}) died or "
                         f"froze{wheres[0] if len(wheres) == 1 else ''} (no heartbeat for "
                         f"{max(now - self.peers[r].beat_seen for r in dead if r in ranks):.0f} s: the node is lost)")
        for r in dead:
            if nodes[r] is None or nodes[r]["node"] not in lost:
                parts.append(f"rank {r} died or froze{records.where(r)} (no heartbeat for "
                             f"{now - self.peers[r].beat_seen:.0f} s)")
        return "; ".join(parts)

    def silent_since(self, beats_then: dict, records: Records) -> list:
        """The peers that have not beaten twice since `beats_then` (a dying rank's last beat can still be seen
        after it, never two) and have not recorded that they finished, stopped or left."""
        return [r for r, peer in self.peers.items() if (peer.beats or 0) - (beats_then.get(r) or 0) < 2
                and not records.any_of(("done", "stopped", "exited"), r)]


def behind(rank: int, counts: dict) -> bool:
    """Whether another member of one of `rank`'s process groups has entered more collectives on it."""
    groups = {}
    for per_rank in counts.values():
        for name, (ranks, _) in per_rank.items():
            groups[name] = ranks
    for name, ranks in groups.items():
        if rank not in ranks:
            continue
        mine = counts.get(rank, {}).get(name, [ranks, 0])[1]
        if any(counts.get(r, {}).get(name, [ranks, 0])[1] > mine for r in ranks if r in counts):
            return True
    return False
