"""The job's layout over its nodes, checked before anything loads (docs/parallel.md "Several nodes").

torchrun gives each rank RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (its node) and
GROUP_WORLD_SIZE (the number of nodes). A consistent job of N nodes has every node 0 … N−1 once, each with the
same L ranks, and node n holds ranks n·L … n·L+L−1 (node-major), so that a model group of consecutive ranks
stays on one node whenever tp·ulysses divides L.

- In the ranks, `check_layout` (from parallel/runtime.py, before the process group forms): each rank checks its
  own environment; on several nodes it then claims its rank in the launcher's store (parallel/store.py), and
  rank 0 reads every claim and posts one verdict that all the ranks take, so that they all refuse together
  (exit 2, rank 0's `error:` line) or all go on. A rank claimed twice (two launchers started as the same node)
  is refused at once. Rank 0 logs the layout, and warns when a model group would span nodes.
- In the launchers, `node_claim` (from launch/torchrun.py): with torchrun's static rendezvous (--node-rank,
  --master-addr, --master-port) node 0's launcher hosts the store. A second launcher started as node 0 cannot
  (the port is taken): it leaves a note in the first one's store and exits 2 with an `error:` line, and the
  first one, still waiting for its other nodes, finds the note and exits 2 too, instead of waiting out the
  rendezvous timeout (600 s) for a node that will never come.

No torch at import.
"""
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

log = logging.getLogger("k4flash")

POLL_S = 0.1
SETTLE_S = 1.0  # rank 0 waits this long after the last rank's first claim, for a second claim of any rank
OK = "ok"


class LayoutError(ValueError):
    """The launchers' layout is inconsistent: refused before any weights load (exit 2)."""


class LaunchConflict(Exception):
    """Two launchers claim node 0 of the same job (or its store's port is another program's)."""


@dataclass(frozen=True)
class Place:
    """Where torchrun put this rank."""
    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int
    nodes: int
    host: str
    pid: int

    @classmethod
    def from_env(cls, environ=None):
        """This process's place from torchrun's environment; None without one (a plain or test-harness run)."""
        env = os.environ if environ is None else environ
        if "GROUP_RANK" not in env or "LOCAL_WORLD_SIZE" not in env:
            return None
        world = int(env["WORLD_SIZE"])
        return cls(rank=int(env["RANK"]), world=world, local_rank=int(env["LOCAL_RANK"]),
                   local_world=int(env["LOCAL_WORLD_SIZE"]), node=int(env["GROUP_RANK"]),
                   nodes=int(env.get("GROUP_WORLD_SIZE", "1")), host=socket.gethostname(), pid=os.getpid())

    @property
    def node_ranks(self) -> range:
        return range(self.node * self.local_world, (self.node + 1) * self.local_world)


def _span(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"


def env_problem(place: Place):
    """What is wrong with this rank's own environment (None: nothing it can see alone)."""
    if place.world != place.nodes * place.local_world:
        return (f"the nodes run different numbers of ranks: node {place.node} runs {place.local_world} of "
                f"{place.world} ranks over {place.nodes} node(s); start every node's launcher with the same "
                "--nproc-per-node")
    if not (0 <= place.node < place.nodes and 0 <= place.local_rank < place.local_world):
        return (f"rank {place.rank} has node {place.node} of {place.nodes} and local rank {place.local_rank} of "
                f"{place.local_world}: not a torchrun layout")
    if place.rank not in place.node_ranks or place.rank - place.node_ranks.start != place.local_rank:
        return (f"rank {place.rank} is local rank {place.local_rank} of node {place.node}: the ranks are not "
                f"node-major (node n must hold ranks n·{place.local_world} … n·{place.local_world}+"
                f"{place.local_world - 1})")
    return None


def duplicate_message(node: int, nodes: int, places) -> str:
    """Two launchers started as the same node: places are a rank's two claims."""
    where = " and ".join(f"{p.host} (pid {p.pid})" for p in places)
    return (f"two launchers both claim node {node}: its {_span(places[0].node_ranks)} started twice, on {where}; "
            f"give each node its own --node-rank, 0 to {nodes - 1}")


def layout_problems(claims: dict, world: int) -> list:
    """What is wrong with a job's claims, {rank: [Place, ...] in claim order}: [] when it is consistent."""
    problems = []
    missing = [r for r in range(world) if not claims.get(r)]
    if missing:
        problems.append(f"{_span(missing)} never started")
    doubled = {}
    for _, places in sorted(claims.items()):
        if len(places) > 1:
            doubled.setdefault(places[0].node, places)
    for node, places in sorted(doubled.items()):
        problems.append(duplicate_message(node, places[0].nodes, places[:2]))
    firsts = [places[0] for places in claims.values() if places]
    if not firsts:
        return problems
    widths = {p.local_world for p in firsts}
    if len(widths) > 1:
        problems.append(f"the nodes run different numbers of ranks ({sorted(widths)}); start every node's launcher "
                        "with the same --nproc-per-node")
        return problems
    nodes = {p.node for p in firsts}
    want = set(range(firsts[0].nodes))
    if nodes != want:
        wrong = [f"node(s) {sorted(ids)} {what}" for ids, what in ((want - nodes, "missing"),
                                                                  (nodes - want, "unexpected")) if ids]
        problems.append(f"{' and '.join(wrong)}: give each node its own --node-rank, 0 to {firsts[0].nodes - 1}")
    for place in firsts:
        if place.rank not in place.node_ranks:
            problems.append(f"rank {place.rank} runs on node {place.node}: the ranks are not node-major")
            break
    hosts = {}
    for place in firsts:
        hosts.setdefault(place.node, set()).add(place.host)
    for node, names in sorted(hosts.items()):
        if len(names) > 1:
            problems.append(f"node {node}'s ranks run on several hosts ({', '.join(sorted(names))})")
    return problems


def group_spans_nodes(group_size: int, local_world: int) -> bool:
    """Whether some model group (group_size consecutive ranks) has ranks on two nodes of local_world ranks."""
    return group_size > local_world or local_world % group_size != 0


def summary(claims: dict) -> str:
    """One line: 'layout: 2 nodes x 2 ranks, node-major (node 0: vm ranks 0-1; node 1: vm ranks 2-3)'."""
    firsts = sorted((places[0] for places in claims.values() if places), key=lambda p: p.rank)
    nodes = {}
    for place in firsts:
        nodes.setdefault(place.node, place)
    shown = [f"node {n}: {p.host} {_span(p.node_ranks)}" for n, p in sorted(nodes.items())[:4]]
    more = f"; {len(nodes) - 4} more" if len(nodes) > 4 else ""
    return f"layout: {len(nodes)} nodes x {firsts[0].local_world} ranks, node-major ({'; '.join(shown)}{more})"


def check_layout(group_size: int, timeout_s: float, environ=None, store=None):
    """Refuse an inconsistent layout (LayoutError) before the process group forms; returns this rank's Place
    (None outside torchrun). Rank 0 logs the layout and warns when a model group would span nodes."""
    env = os.environ if environ is None else environ
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if rank == 0 and group_spans_nodes(group_size, local_world):
        # TP sends 2 collectives per block, Ulysses 2 all-to-alls: across nodes they leave NVLink for the network.
        log.warning("a model group (parallel.tp x parallel.ulysses = %d consecutive ranks) spans nodes of %d "
                    "ranks; prefer tp x ulysses dividing the ranks per node, and data parallelism across nodes",
                    group_size, local_world)
    place = Place.from_env(env)
    if place is None:
        return None
    problem = env_problem(place)
    if problem:
        raise LayoutError(problem)
    if place.nodes == 1:
        return place
    if store is None:
        from .store import RunStore
        store = RunStore.launcher("layout")
    claim = store.add(f"claims/{place.rank}")
    store.set(f"place/{place.rank}/{claim}", json.dumps(asdict(place)))
    if claim > 1:  # a second launcher started as this node: refused whatever rank 0 decides
        first = Place(**json.loads(store.wait(f"place/{place.rank}/1", POLL_S, timeout_s)))
        message = duplicate_message(place.node, place.nodes, [first, place])
        if place.rank != 0 and place.local_rank == 0:  # rank 0's line may be on another node's screen, or never come
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
        raise LayoutError(message)
    store.add("claimed")
    if place.rank == 0:
        verdict = _decide(store, place, timeout_s)
        store.set("verdict", verdict)
    else:
        try:
            verdict = store.wait("verdict", 2 * POLL_S, timeout_s + 2 * SETTLE_S)
        except TimeoutError:
            verdict = f"rank 0 gave no verdict on the layout within parallel.timeout_s={timeout_s:g} s"
    if verdict != OK:
        raise LayoutError(verdict)
    return place


def _decide(store, place: Place, timeout_s: float) -> str:
    """Rank 0: OK, or the first problem of the job's claims once every rank has claimed (or timeout_s passed)."""
    deadline = time.monotonic() + timeout_s
    while store.add("claimed", 0) < place.world and time.monotonic() < deadline:
        time.sleep(POLL_S)
    time.sleep(SETTLE_S)  # near-simultaneous second claims (a duplicate node's ranks) are seen, not raced
    claims = {}
    for rank in range(place.world):
        count = store.add(f"claims/{rank}", 0)
        claims[rank] = [Place(**json.loads(store.wait(f"place/{rank}/{n}", POLL_S, 10.0))) for n in range(1, count + 1)]
    problems = layout_problems(claims, place.world)
    if problems and problems[0].endswith("never started"):
        problems[0] += (f" within parallel.timeout_s={timeout_s:g} s: is every node's launcher running, with "
                        f"--nnodes {place.nodes} and --nproc-per-node {place.local_world}?")
    if problems:
        return problems[0]
    log.info(summary(claims))
    return OK


# ---- the launchers: node 0 claimed twice under torchrun's static rendezvous ----

WATCH_POLL_S = 0.5
CONNECT_S = 5.0


@dataclass(frozen=True)
class StaticNode:
    node: int
    nodes: int
    host: str
    port: int
    run_id: str

    @property
    def note_key(self) -> str:
        return f"k4flash/launch/{self.run_id}/node-0-refused"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def static_node(args):
    """This launcher's part in torchrun's static rendezvous of several nodes (parsed torchrun args); else None."""
    if getattr(args, "standalone", False) or getattr(args, "rdzv_backend", "static") != "static":
        return None
    from torch.distributed.run import parse_min_max_nnodes

    if parse_min_max_nnodes(args.nnodes)[1] <= 1:
        return None
    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or 29500}"
    host, _, port = endpoint.rpartition(":")
    return StaticNode(int(args.node_rank), parse_min_max_nnodes(args.nnodes)[1], host.strip("[]"), int(port),
                      args.rdzv_id)


def _client(node: StaticNode, timeout_s: float):
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(node.host, node.port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False)


def _address_in_use(err: BaseException) -> bool:
    text = str(err)
    return type(err).__name__ == "DistNetworkError" and ("EADDRINUSE" in text or "address already in use" in text)


def _refused(node: StaticNode) -> str:
    """This launcher could not host node 0's store: tell the one that does, and say why."""
    told = []

    def tell():  # in a thread: a silent program on the port would hold a store client past its own timeout
        try:
            _client(node, CONNECT_S).set(node.note_key, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            told.append(True)
        except Exception:  # noqa: BLE001 (not a store, or gone: either way not ours to host)
            pass
    thread = threading.Thread(target=tell, name="k4flash-node-claim", daemon=True)
    thread.start()
    thread.join(CONNECT_S + 1.0)
    if not told:
        return (f"--master-port {node.port} on {node.host} is taken by another program: node 0's launcher hosts the "
                "job's store there; choose a free --master-port (the same on every node)")
    return (f"two launchers both claim node 0 (--node-rank 0): another launcher already hosts the job's store at "
            f"{node.address}; give each node its own --node-rank, 0 to {node.nodes - 1} (another job: another "
            "--master-port)")


def _hook_rendezvous(done: threading.Event) -> None:
    """Set `done` when the agent's rendezvous completes (torchelastic's metrics: `_rendezvous.success`)."""
    from torch.distributed.elastic import metrics

    previous = metrics.getStream("torchelastic").handler

    class Handler(metrics.MetricHandler):
        def emit(self, metric_data):
            if metric_data.name.endswith("_rendezvous.success"):
                done.set()
            previous.emit(metric_data)

    metrics.configure(Handler(), "torchelastic")


def _watch(node: StaticNode, done: threading.Event, stop: threading.Event) -> None:
    """Node 0's launcher, while it waits for its other nodes: end it if a second node-0 launcher was refused."""
    store = None
    while not stop.wait(WATCH_POLL_S) and not done.is_set():
        try:
            store = store or _client(node, 2.0)
            note = store.get(node.note_key).decode() if store.check([node.note_key]) else None
        except Exception:  # noqa: BLE001 (the store is not up yet)
            store = None
            continue
        if note and not done.is_set() and not stop.is_set():
            other = json.loads(note)
            sys.stderr.write(f"error: two launchers both claim node 0 (--node-rank 0) of the job at {node.address}: "
                             f"this one hosts its store, and one started on {other['host']} (pid {other['pid']}) "
                             f"was refused; give each node its own --node-rank, 0 to {node.nodes - 1}\n")
            sys.stderr.flush()
            os._exit(2)  # the agent is blocked in the store's wait for its nodes: no rank has started


@contextmanager
def node_claim(args):
    """Around torchrun's run(args): a second node-0 launcher gets LaunchConflict (its message the `error:` line),
    and the first one, still waiting for nodes, exits 2 with its own line (see the module's docstring)."""
    node = static_node(args)
    if node is None or node.node != 0:
        yield
        return
    done, stop = threading.Event(), threading.Event()
    _hook_rendezvous(done)
    watcher = threading.Thread(target=_watch, args=(node, done, stop), name="k4flash-node-claim", daemon=True)
    watcher.start()
    try:
        yield
    except Exception as err:
        if not _address_in_use(err):
            raise
        stop.set()
        watcher.join(WATCH_POLL_S + 2.5)  # at most one store connection attempt (_watch's 2 s)
        raise LaunchConflict(_refused(node)) from None
    finally:
        stop.set()
