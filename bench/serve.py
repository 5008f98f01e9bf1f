"""The server under load: a concurrency sweep on loopback with cancels mixed in; latency, throughput, none lost.

    python -m bench.serve [--sweep 1,4,16 | --concurrency 4] [--requests N] [--cancel-every 5]
                          [--cancel-delay 0.3] [--seed 0] [--ranks 1[,2]] [--queue-size Q] [--timeout 600]
                          [--model tiny] [--seconds 0] [--size 512x512] [--overrides parallel.tp=1 ...]
                          [--workdir DIR] [--json F] [--md F]

For each --ranks value one server is started (`run_inference_distil.py mode=serve` on a free loopback
port, under torchrun when ranks > 1; the tiny model on CPU by default, `--model kandinsky4_flash
weights_dir=...` on a GPU node) and runs every round of the sweep, then is stopped with SIGTERM.
With ranks > 1 and no parallel.* override, parallel.tp=1 is added: every rank is a model group of
its own, so --ranks 2 measures 2 data-parallel groups (the dp column reads the server's mesh).

A round at concurrency C: C client threads share --requests requests (default max(16, 2·C), so each
client submits at least twice and the round measures a steady queue rather than one burst). Each
client submits (retrying after Retry-After on 429), polls until the video reaches a final status and
downloads the completed ones. Every --cancel-every'th submission of the round (0: none) is cancelled
by its client after a delay drawn uniformly from [0, --cancel-delay] s by a generator seeded with
(--seed, C, submission number), the same delays on every run; the delay counts from the submission
for the 1st, 3rd, ... cancel (at high concurrency: still queued) and from the moment the client
sees the video in progress for the 2nd, 4th, ... (stopped at a step boundary, at any concurrency),
so every round has both kinds. 0.3 s by default: the tiny model's 4 steps take about 0.5 s on 2
cores and its decode several times more, so later cancels would mostly come too late (a video past
its last step may still complete). `--concurrency C` without --sweep is one round.

Per round: completed, cancelled (how: queued at once / at a step boundary in progress / too late, the
video completed), failed with their reasons, lost, 429s met, p50 / p95 submit→completed (completed
only), videos per minute of the round's wall time, cancel→cancelled latency, the content's first
byte. Lost must be 0: a request with no final record, one the server does not list (or lists with
another status), a completed video whose content cannot be fetched, or a cancelled video that left
its `<id>.mp4` / `.png` behind (looked for after the round and again after the server stopped).
"""
import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.report import Report, add_output_args
from bench.server import Server

FINAL = ("completed", "failed", "cancelled")
POLL_S = 0.1  # a client's poll; C clients polling faster would take the 2 cores from the model they measure
CANCEL_POLL_S = 0.02  # after a cancel: finer, as the cancel latency is measured by it, and only for that one video


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else None


def _levels(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _final(server, video_id, timeout, poll_s=POLL_S, statuses=FINAL):
    """(record, when seen) once the video's status is one of `statuses`; (last record or None, None) past the
    timeout or on a 404 — no assert here: a request the server drops is counted as lost, its client goes on."""
    deadline, record = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status, body = server.status(f"/v1/videos/{video_id}", key=None)
        if status == 404:
            return None, None
        if status == 200:
            record = json.loads(body)
            if record["status"] in statuses:
                return record, time.perf_counter()
        time.sleep(poll_s)
    return record, None


class Round:
    """One concurrency level against a running server: the shared job list, the submission counter, the results."""

    def __init__(self, server, concurrency, requests, request, args):
        self.server, self.concurrency, self.request, self.args = server, concurrency, request, args
        self.jobs, self.results, self.lock, self.submitted = list(range(requests))[::-1], [], threading.Lock(), 0

    def run(self):
        threads = [threading.Thread(target=self._client) for _ in range(self.concurrency)]
        clock = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - clock

    def _client(self):
        while True:
            with self.lock:
                if not self.jobs:
                    return
                index = self.jobs.pop()
            try:
                result = self._one(index)
            except Exception as err:  # noqa: BLE001 — a client that dies must still leave a row, counted as lost
                result = dict(index=index, status=None, rejected=0, error=f"client: {type(err).__name__}: {err}")
            with self.lock:
                self.results.append(result)

    def _one(self, index):
        server, args = self.server, self.args
        rejected, started = 0, time.perf_counter()
        while True:
            status, body, headers = server.request("POST", "/v1/videos", dict(self.request, seed=index), key=None)
            if status != 429:
                break
            rejected += 1
            time.sleep(float(headers.get("Retry-After", "1")))
        if status != 200:
            return dict(index=index, status="failed", rejected=rejected,
                        error=f"refused: HTTP {status} {body[:200].decode(errors='replace')}")
        video_id = json.loads(body)["id"]
        with self.lock:  # the n-th submission of the round, in the order the server accepted them
            self.submitted += 1
            number = self.submitted
        result = dict(index=index, id=video_id, rejected=rejected, cancel=None)
        if args.cancel_every and number % args.cancel_every == 0:
            if number // args.cancel_every % 2 == 0:  # every other cancel counts its delay from the start of work
                _final(server, video_id, args.timeout, CANCEL_POLL_S, ("in_progress", *FINAL))
            time.sleep(random.Random(f"{args.seed}-{self.concurrency}-{number}").uniform(0, args.cancel_delay))
            asked = time.perf_counter()
            status, body, _ = server.request("POST", f"/v1/videos/{video_id}/cancel", key=None)
            answer = json.loads(body) if status == 200 else {}
            # 200 + cancelled: it was queued; 200 + in_progress: it stops at a step boundary; 409: it had ended
            result["cancel"] = answer.get("status", f"HTTP {status}")
            record, seen = (answer, time.perf_counter()) if answer.get("status") in FINAL else \
                _final(server, video_id, args.timeout, CANCEL_POLL_S)
            if record and record["status"] == "cancelled":
                result["cancel_latency_s"] = seen - asked
        else:
            record, seen = _final(server, video_id, args.timeout)
        result.update(status=record["status"] if seen else None, latency_s=seen - started if seen else None,
                      error=((record or {}).get("error") or {}).get("message") if seen else
                      f"no final status ({'last ' + record['status'] if record else 'no record'})")
        if result["status"] == "completed":
            url = f"http://{server.host}:{server.port}/v1/videos/{video_id}/content"
            clock = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as response:
                response.read(1)
                result["first_byte_s"] = time.perf_counter() - clock
                result["content_bytes"] = 1 + len(response.read())
        return result


def _leftovers(server, video_ids):
    """The cancelled videos whose output file exists (a cancel must leave none)."""
    return {v for v in video_ids for suffix in (".mp4", ".png") if (server.output_dir / f"{v}{suffix}").exists()}


def _row(ranks, dp, concurrency, requests, results, wall_s, listed, leftover):
    """The round's figures; `lost_why` says what made each lost one lost."""
    by = lambda status: [r for r in results if r["status"] == status]  # noqa: E731
    completed, cancelled, failed = by("completed"), by("cancelled"), by("failed")
    lost_why = []
    for r in results:
        known = r.get("id") in listed
        why = (r["error"] if r["status"] is None else
               "not listed by the server" if r.get("id") and not known else
               f"listed as {listed[r['id']]} but ended {r['status']}" if known and listed[r["id"]] != r["status"] else
               "completed but no content" if r["status"] == "completed" and not r.get("content_bytes") else
               "cancelled but its output file is there" if r.get("id") in leftover else None)
        if why:
            lost_why.append(f"{r.get('id', r['index'])}: {why}")
    missing = requests - len(results)  # a client thread that left no row at all (never expected)
    asked = [r for r in results if r.get("cancel")]
    latencies = [r["latency_s"] for r in completed]
    cancel_latencies = [r["cancel_latency_s"] for r in cancelled if r.get("cancel_latency_s") is not None]
    first_bytes = [r["first_byte_s"] for r in completed if r.get("first_byte_s") is not None]
    how = dict(queued=sum(r["cancel"] == "cancelled" for r in cancelled),
               running=sum(r["cancel"] == "in_progress" for r in cancelled),
               late=sum(r["cancel"] in ("in_progress", "HTTP 409") and r["status"] == "completed" for r in asked))
    return dict(
        ranks=ranks, dp=dp, requests=requests, concurrency=concurrency, completed=len(completed),
        cancelled=len(cancelled), cancel_asked=len(asked), cancelled_queued=how["queued"],
        cancelled_in_progress=how["running"], cancel_too_late=how["late"],
        cancels=f"{len(asked)}: {how['queued']} / {how['running']} / {how['late']}",
        failed=len(failed), failed_reasons=sorted({r["error"] or "NO REASON" for r in failed}),
        cancel_refused=sorted({r["cancel"] for r in asked} - {"cancelled", "in_progress", "HTTP 409"}),
        lost=missing + len(lost_why), lost_why=lost_why + [f"{missing} request(s) without a result"] * (missing > 0),
        rejected_429=sum(r["rejected"] for r in results), wall_s=wall_s,
        videos_per_min=60 * len(completed) / wall_s, p50_s=statistics.median(latencies) if latencies else None,
        p95_s=_percentile(latencies, 0.95),
        cancel_ms=1000 * statistics.median(cancel_latencies) if cancel_latencies else None,
        first_byte_ms=1000 * statistics.median(first_bytes) if first_bytes else None,
        every_request_ended=len(results) == requests and all(
            r["status"] in ("completed", "cancelled") or (r["status"] == "failed" and r["error"]) for r in results),
        cancelled_ids=[r["id"] for r in cancelled])


def _serve(ranks, levels, args, request, workdir):
    """One server for every round of the sweep: its rows."""
    from k4flash.tiny import ensure_tiny_weights

    overrides = list(args.overrides)
    if ranks > 1 and not any(o.lstrip("+").startswith("parallel.") for o in overrides):
        overrides.append("parallel.tp=1")  # one rank per model group: --ranks 2 is 2 data-parallel groups
    queue = args.queue_size or max(2, *levels)
    server = Server(workdir, ensure_tiny_weights().parent, ranks, f"serve.queue_size={queue}", *overrides,
                    model=args.model)
    rows = []
    try:
        dp = json.loads(server.status("/v1/models", key=None)[1])["data"][0].get("mesh", {}).get("dp")
        for concurrency in levels:
            requests = args.requests or max(16, 2 * concurrency)
            one = Round(server, concurrency, requests, request, args)
            wall_s = one.run()
            listed = {v["id"]: v["status"] for v in json.loads(server.status("/v1/videos", key=None)[1])["data"]}
            cancelled = [r["id"] for r in one.results if r["status"] == "cancelled"]
            rows.append(_row(ranks, dp, concurrency, requests, one.results, wall_s, listed,
                             _leftovers(server, cancelled)))
    except Exception:
        print(server.output())
        raise
    finally:
        status = server.stop()
    for row in rows:  # a file written after the cancel, even while draining, still counts
        late = _leftovers(server, row["cancelled_ids"]) - {w.split(":")[0] for w in row["lost_why"]}
        row["lost"] += len(late)
        row["lost_why"] += [f"{v}: cancelled but its output file is there after the server stopped" for v in late]
        row["server_exit"] = status
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", help="concurrency levels, e.g. 1,4,16: one round each on the same server")
    parser.add_argument("--concurrency", type=int, default=4, help="without --sweep: the one round's level")
    parser.add_argument("--requests", type=int, help="per round (default max(16, 2 x concurrency))")
    parser.add_argument("--cancel-every", type=int, default=5, help="cancel every N-th submission (0: none)")
    parser.add_argument("--cancel-delay", type=float, default=0.3, help="cancel after U(0, this) seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the cancel delays")
    parser.add_argument("--ranks", default="1", help="torchrun ranks, one server each, e.g. 1,2 (1: one process)")
    parser.add_argument("--queue-size", type=int, help="serve.queue_size (default the top level: no 429s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a video may take to end before lost")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seconds", type=int, default=0, help="time_length of every request (0: an image)")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--overrides", nargs="*", default=[], help="more run_inference_distil.py overrides")
    parser.add_argument("--workdir", type=Path, help="keep each server's directory (videos, records, log) here")
    add_output_args(parser)
    args = parser.parse_args(argv)
    levels, rank_counts = _levels(args.sweep or args.concurrency), _levels(args.ranks)
    report = Report("serve", model=args.model, ranks=args.ranks, sweep=levels, requests=args.requests or
                    "max(16, 2C)", cancel_every=args.cancel_every, cancel_delay_s=args.cancel_delay, seed=args.seed,
                    seconds=args.seconds, size=args.size, overrides=args.overrides)
    request = {"prompt": "a red square on a blue field", "seconds": args.seconds, "size": args.size}
    rows = []
    for ranks in rank_counts:
        if args.workdir:
            (args.workdir / f"ranks{ranks}").mkdir(parents=True, exist_ok=True)
            rows += _serve(ranks, levels, args, request, args.workdir / f"ranks{ranks}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows += _serve(ranks, levels, args, request, tmp)
    report.table("Serving videos on loopback: a concurrency sweep with cancels", [
        ("ranks", "ranks", None), ("dp", "dp groups", None), ("concurrency", "concurrency", None),
        ("requests", "requests", None), ("completed", "completed", None), ("cancelled", "cancelled", None),
        ("cancels", "cancels asked: queued / in progress / too late", None),
        ("failed", "failed (with a reason)", None), ("lost", "lost", None), ("rejected_429", "429s met", None),
        ("videos_per_min", "videos / min", ".1f"), ("p50_s", "p50 submit→completed s", ".2f"),
        ("p95_s", "p95 s", ".2f"), ("cancel_ms", "cancel→cancelled ms (median)", ".0f"),
        ("first_byte_ms", "content first byte ms (median)", ".1f"),
        ("server_exit", "server exit after SIGTERM", None)], rows)
    for row in rows:
        for text in row["failed_reasons"]:
            report.note(f"ranks {row['ranks']}, concurrency {row['concurrency']}: failed: {text}")
        for text in row["cancel_refused"]:
            report.note(f"ranks {row['ranks']}, concurrency {row['concurrency']}: a cancel was answered {text}")
        for text in row["lost_why"]:
            report.note(f"ranks {row['ranks']}, concurrency {row['concurrency']}: LOST {text}")
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
