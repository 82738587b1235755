"""How many slow requests a gateway holds at once: a provider that takes its time.

    .venv/bin/python bench/capacity.py [--threads 4 16 32] [--delay 1.0] [--clients 96]
                                       [--duration 15] [--workers 2]

A real provider answers in seconds, not microseconds: what bounds a gateway then is how
many requests it can hold while they wait, not its CPU. The fake upstream answers every
call after --delay seconds; Tollgate runs under gunicorn (the repository's
gunicorn.conf.py, gthread workers, GUNICORN_THREADS set to each value of --threads in
turn) with quotas and the ledger on; --clients client threads send cache misses to
`POST /api/v1/generate` over keep-alive connections for --duration seconds.

Reported per thread count: answered requests per second (the ceiling is workers x
threads / delay), latency p50 / p99 (the delay plus the time waiting for a free thread),
errors, peak RSS per worker (VmHWM), the CPU per request, and the most PostgreSQL
connections the gateway's workers held at once (sampled from pg_stat_activity every
0.2 s): each thread that has written a ledger row keeps its own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.generate import (  # noqa: E402 - sets the environment's defaults first
    MODEL,
    children,
    free_port,
    gunicorn_start,
    proc_hwm_mib,
    setup_database,
    wait_http,
)


def threads_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads, from the scheduler's nanosecond accounting
    (/proc/PID/stat's clock ticks charge a whole tick to a thread woken on one, and
    misread requests that spend most of their time waiting)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def connections_held(database: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return int(cursor.fetchone()[0])


def run(threads: int, args: argparse.Namespace, key: str, up_port: int) -> dict[str, float]:
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "OPENAI_API_KEY": "sk-bench",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_WORKER_CLASS": "gthread",
        "GUNICORN_THREADS": str(threads),
        "GUNICORN_TIMEOUT": "120",
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="tollgate-bench-prom-"),
        "PYTHONPATH": str(ROOT),
    }
    gunicorn = gunicorn_start(env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live")
        workers = children(gunicorn.pid)
        # A worker loads the views and the provider SDKs, then freezes its heap, after it
        # starts (config/gunicorn_hooks.py): a second of CPU that is not the requests'.
        time.sleep(5)
        database = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
        latencies: list[float] = []
        errors = 0
        lock = threading.Lock()
        stop = time.monotonic() + args.duration

        def client() -> None:
            nonlocal errors
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.delay + 60)
            headers = {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "X-Forwarded-Proto": "https",  # as behind deploy/nginx
            }
            while time.monotonic() < stop:
                body = json.dumps({"prompt": f"capacity {uuid.uuid4().hex}", "model": MODEL})
                started = time.perf_counter()
                try:
                    conn.request("POST", "/api/v1/generate", body, headers)
                    response = conn.getresponse()
                    answer = response.read()
                    ok = response.status == 200
                    if not ok and not errors:
                        sys.stderr.write(f"{response.status}: {answer[:300]!r}\n")
                except (OSError, http.client.HTTPException):
                    ok = False
                    conn.close()
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
            conn.close()

        cpu_before, started = sum(threads_cpu(pid) for pid in workers), time.monotonic()
        clients = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in clients:
            t.start()
        most_connections = 0
        while any(t.is_alive() for t in clients):
            most_connections = max(most_connections, connections_held(database))
            time.sleep(0.2)
        elapsed = time.monotonic() - started  # the last answers come after --duration
        cpu = sum(threads_cpu(pid) for pid in workers) - cpu_before
        rss = max(proc_hwm_mib(pid) for pid in workers)
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(timeout=60)
    ordered = sorted(latencies)
    answered = len(ordered)
    return {
        "threads": threads,
        "rps": answered / elapsed,
        "p50": statistics.median(ordered) * 1000 if ordered else 0.0,
        "p99": ordered[int(0.99 * (answered - 1))] * 1000 if ordered else 0.0,
        "errors": errors,
        "rss": rss,
        "cpu_ms": 1000 * cpu / answered if answered else 0.0,
        "connections": most_connections,
        "ceiling": args.workers * threads / args.delay,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--delay", type=float, default=1.0, help="the provider's seconds")
    parser.add_argument("--clients", type=int, default=96)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    key = setup_database()
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "generation.tests.fake_upstream", str(up_port), str(args.delay)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{up_port}/")
        results = [run(threads, args, key, up_port) for threads in args.threads]
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(timeout=30)
    sys.stdout.write(
        f"{args.workers} gthread workers, provider delay {args.delay} s, {args.clients} clients, "
        f"{args.duration:.0f} s each\n\n"
        "| threads per worker | req/s (ceiling) | p50 / p99 | errors | peak RSS per worker "
        "| CPU per request | PostgreSQL connections held |\n|---|---|---|---|---|---|---|\n"
    )
    for r in results:
        sys.stdout.write(
            f"| {r['threads']} | {r['rps']:.1f} ({r['ceiling']:.0f}) "
            f"| {r['p50']:.0f} / {r['p99']:.0f} ms | {r['errors']} | {r['rss']:.0f} MiB "
            f"| {r['cpu_ms']:.2f} ms | {r['connections']} |\n"
        )


if __name__ == "__main__":
    main()
