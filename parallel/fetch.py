"""Missing weights are downloaded by rank 0 while the others wait outside the process group
(docs/parallel.md "Mesh and roles").

A download of tens of GB can take longer than any collective timeout, so it must not sit
behind a barrier of the process group. Rank 0 downloads; the other ranks wait on a key in
the launcher's store (parallel/store.py, namespace `weights`) for as long as the download
takes (`wait_s`, a day by default) and not for `parallel.timeout_s`. A failed download is
published too, so every rank stops with rank 0's message instead of waiting.
"""
import time

from .store import RunStore

DOWNLOAD_WAIT_S = 24 * 3600.0
POLL_S = 0.5
READ_WAIT_S = 10.0  # how long rank 0 waits for the others to read its failure before it leaves


def fetch_on_rank0(resolve, rank: int, world_size: int, wait_s: float = DOWNLOAD_WAIT_S):
    """resolve(download: bool) → WeightPaths, downloading on rank 0 only, before any process group.

    Rank 0 runs resolve(True) and publishes "ok" or its error's one line; the others wait for that,
    then run resolve(False) (or raise FileNotFoundError with rank 0's message). One process: resolve(True).
    """
    if world_size == 1:
        return resolve(True)
    store = RunStore.launcher("weights", timeout_s=60.0)
    if rank == 0:
        try:
            paths = resolve(True)
        except Exception as err:
            store.set("result", f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            # The store lives in this process: leaving at once could close it before the others read the error.
            deadline = time.monotonic() + READ_WAIT_S
            while store.add("read", 0) < world_size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
            raise
        store.set("result", "ok")
        return paths
    try:
        result = store.wait("result", POLL_S, wait_s)
    except TimeoutError:
        raise TimeoutError(f"rank {rank}: rank 0 did not finish fetching the weights in {wait_s:.0f} s") from None
    store.add("read", 1)
    if result != "ok":
        raise FileNotFoundError(f"rank 0 could not fetch the weights ({result.removeprefix('error: ')})")
    return resolve(False)
