"""Weights are fetched on rank 0 while the others wait on the launcher's store, not in a collective:
a download longer than the collective timeout does not abort the job, and a failed one stops every rank."""
import time
from datetime import timedelta


from parallel.spawn import run_ranks

DOWNLOAD_S = 4.0
COLLECTIVE_TIMEOUT_S = 2.0


def _ranks(runtime, fail):
    import torch.distributed as dist

    from parallel.fetch import fetch_on_rank0

    calls = []

    def resolve(download):
        calls.append(download)
        if runtime.rank == 0 and download:
            time.sleep(DOWNLOAD_S)  # a slow link
            if fail:
                raise FileNotFoundError("dit weights not found at w/x.pt; the Hub is unreachable")
        return "paths"

    out = {}
    try:
        out["result"] = fetch_on_rank0(resolve, runtime.rank, runtime.world_size)
    except FileNotFoundError as err:
        out["error"] = str(err)
    out["calls"] = calls
    if not fail:  # the negative control: the same wait as a barrier with a short timeout fails
        group = dist.new_group(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            if runtime.rank == 0:
                time.sleep(DOWNLOAD_S)
            dist.barrier(group=group)
            out["barrier"] = "ok"
        except RuntimeError as err:
            out["barrier"] = type(err).__name__
    return out


def test_a_download_longer_than_the_collective_timeout_is_waited_for():
    results = run_ranks(2, _ranks, False)
    assert [r["result"] for r in results] == ["paths", "paths"]
    assert results[0]["calls"] == [True] and results[1]["calls"] == [False]  # only rank 0 downloads
    assert "ok" not in {r["barrier"] for r in results}  # a barrier would have timed out


def test_a_failed_download_stops_every_rank_with_rank_0s_message():
    results = run_ranks(2, _ranks, True)
    assert "the Hub is unreachable" in results[0]["error"]
    assert results[1]["error"].startswith("rank 0 could not fetch the weights (dit weights not found")
    assert results[1]["calls"] == []  # it never looked for files rank 0 did not get
