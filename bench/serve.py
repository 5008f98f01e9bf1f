"""The server under load: N requests at concurrency C on loopback, latency and throughput, none lost.

    python -m bench.serve [--requests 16] [--concurrency 4] [--ranks 1] [--overrides parallel.tp=1 ...]
                          [--model tiny] [--seconds 0] [--size 512x512] [--json F] [--md F]

Starts `run_inference_distil.py mode=serve` on a free loopback port (the tiny model on CPU by
default; `--model kandinsky4_flash weights_dir=...` on a GPU node), waits for /health, then C
client threads each submit a video (retrying after Retry-After on 429), poll it every 50 ms until
it is completed or failed, and download it. Reports throughput (videos completed per minute of
wall time), p50 / p95 latency from submit to completed, time to the first byte of the content,
how many 429s were met, and checks that every request ended completed or failed with a reason and
that the server lists every one (none lost). The server is stopped with SIGTERM at the end.
"""
import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request

from bench.report import Report, add_output_args
from bench.server import Server


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else None


def _client(server, jobs, results, lock, request):
    while True:
        with lock:
            if not jobs:
                return
            index = jobs.pop()
        rejected, started = 0, time.perf_counter()
        while True:
            status, body, headers = server.request("POST", "/v1/videos", dict(request, seed=index), key=None)
            if status != 429:
                break
            rejected += 1
            time.sleep(float(headers.get("Retry-After", "1")))
        if status != 200:
            results.append(dict(index=index, status=f"refused {status}", rejected=rejected, error=body[:200].decode()))
            continue
        video_id = json.loads(body)["id"]
        record = server.wait(video_id, timeout=3600)
        done = time.perf_counter()
        first_byte = None
        if record["status"] == "completed":
            url = f"http://{server.host}:{server.port}/v1/videos/{video_id}/content"
            clock = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as response:
                response.read(1)
                first_byte = time.perf_counter() - clock
                response.read()
        results.append(dict(index=index, id=video_id, status=record["status"], latency_s=done - started,
                            first_byte_s=first_byte, rejected=rejected, error=(record.get("error") or {}).get("message")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=1, help="torchrun ranks (1: one process)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seconds", type=int, default=0, help="time_length of every request (0: an image)")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--overrides", nargs="*", default=[], help="more run_inference_distil.py overrides")
    add_output_args(parser)
    args = parser.parse_args(argv)
    report = Report("serve", model=args.model, ranks=args.ranks, requests=args.requests,
                    concurrency=args.concurrency, seconds=args.seconds, size=args.size, overrides=args.overrides)
    request = {"prompt": "a red square on a blue field", "seconds": args.seconds, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        from k4flash.tiny import ensure_tiny_weights

        cache = ensure_tiny_weights().parent
        server = Server(tmp, cache, args.ranks, f"serve.queue_size={max(2, args.concurrency)}", *args.overrides,
                        model=args.model)
        try:
            results, lock, jobs = [], threading.Lock(), list(range(args.requests))
            clock = time.perf_counter()
            threads = [threading.Thread(target=_client, args=(server, jobs, results, lock, request))
                       for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall_s = time.perf_counter() - clock
            listed = {v["id"] for v in json.loads(server.status("/v1/videos", key=None)[1])["data"]}
        finally:
            status = server.stop()
    completed = [r for r in results if r["status"] == "completed"]
    latencies = [r["latency_s"] for r in completed]
    first_bytes = [r["first_byte_s"] for r in completed]
    ended = all(r["status"] == "completed" or (r["status"] == "failed" and r["error"]) for r in results)
    lost = args.requests - len(results) + sum(1 for r in results if r.get("id") and r["id"] not in listed)
    row = dict(requests=args.requests, concurrency=args.concurrency, completed=len(completed),
               failed=len(results) - len(completed), lost=lost, rejected_429=sum(r["rejected"] for r in results),
               wall_s=wall_s, videos_per_min=60 * len(completed) / wall_s,
               p50_s=statistics.median(latencies) if latencies else None, p95_s=_percentile(latencies, 0.95),
               first_byte_ms=1000 * statistics.median(first_bytes) if first_bytes else None,
               every_request_ended=ended, server_exit=status)
    report.table("Serving videos on loopback", [
        ("requests", "requests", None), ("concurrency", "concurrency", None), ("completed", "completed", None),
        ("failed", "failed (with a reason)", None), ("lost", "lost", None), ("rejected_429", "429s met", None),
        ("videos_per_min", "videos / min", ".1f"), ("p50_s", "p50 submit→completed s", ".2f"),
        ("p95_s", "p95 s", ".2f"), ("first_byte_ms", "content first byte ms (median)", ".1f"),
        ("server_exit", "server exit status after SIGTERM", None)], [row])
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
