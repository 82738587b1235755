"""Admission + settlement latency and Redis round trips per request.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/tollgate REDIS_URL=redis://127.0.0.1:6379/15 \
        .venv/bin/python bench/admission.py [--requests 4000] [--threads 1 8]

Each request is one admission (every window of key, plan and global scopes checked and
reserved) and one settlement (the reservation replaced by actual usage, the ledger INSERT).
Round trips are counted by Redis itself (INFO commandstats), not estimated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tollgate_bench_admission")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("SECRET_KEY", "bench-only")
os.environ.setdefault("USAGE_HIT_BATCH_SECONDS", "1")

from bench.common import ensure_database  # noqa: E402

ensure_database(os.environ["DATABASE_URL"])

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django_redis import get_redis_connection  # noqa: E402

from quotas import services  # noqa: E402
from quotas.models import GlobalLimits, ModelPrice, Plan, UsageRecord, UserQuota  # noqa: E402


def setup() -> tuple[int, int]:
    call_command("migrate", verbosity=0)
    ModelPrice.objects.update_or_create(
        model="local/demo",
        defaults={
            "provider": "local",
            "upstream_model": "demo",
            "input_per_million": "1.5",
            "output_per_million": "2",
        },
    )
    plan, _ = Plan.objects.update_or_create(
        name="bench",
        defaults={
            "requests_per_minute": 10**9,
            "requests_per_hour": 10**9,
            "requests_per_day": 10**9,
            "tokens_per_minute": 10**12,
            "tokens_per_day": 10**12,
            "cost_per_day": "1000000",
            "cost_per_month": "1000000",
            "concurrency": 10_000,
        },
    )
    user, _ = get_user_model().objects.get_or_create(username="bench")
    UserQuota.objects.update_or_create(user=user, defaults={"plan": plan})
    GlobalLimits.objects.update_or_create(
        pk=1,
        defaults={"requests_per_hour": 10**9, "cost_per_day": "1000000", "concurrency": 10_000},
    )
    _, key = services.key_create(user=user, name="bench", requests_per_minute=10**9)
    return user.pk, key.pk


def commandstats(conn) -> dict[str, tuple[int, int]]:
    """(calls, microseconds) of each command since Redis started (or CONFIG RESETSTAT)."""
    stats = conn.info("commandstats")
    return {name: (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def run(user_id: int, key_id: int, requests: int, threads: int) -> dict[str, float]:
    admit_ms: list[float] = []
    settle_ms: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        t0 = time.perf_counter()
        a = services.admission_admit(
            user_id=user_id,
            key_id=key_id,
            model="local/demo",
            request_id=uuid.uuid4().hex,
            prompt_tokens=50,
            max_tokens=200,
        )
        t1 = time.perf_counter()
        services.usage_settle(admission=a, prompt_tokens=50, completion_tokens=120, latency_ms=1)
        t2 = time.perf_counter()
        with lock:
            admit_ms.append((t1 - t0) * 1000)
            settle_ms.append((t2 - t1) * 1000)

    def worker(n: int) -> None:
        try:
            for i in range(n):
                one(i)
        finally:
            close_old_connections()

    # Warm up: policy cache, script load, connections.
    for i in range(50):
        one(i)
    admit_ms.clear()
    settle_ms.clear()
    conn = get_redis_connection("default")
    before = commandstats(conn)
    start = time.perf_counter()
    per = requests // threads
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, [per] * threads))
    elapsed = time.perf_counter() - start
    after = commandstats(conn)
    done = per * threads
    calls = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after}
    # INFO commandstats also counts the commands a script runs; each EVALSHA is one round
    # trip, and nothing else on this path talks to Redis. A script's time includes the
    # time of the commands it runs: the server's time per request is the scripts' alone.
    round_trips = calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0)
    inside = sum(v for k, v in calls.items() if k not in ("cmdstat_evalsha", "cmdstat_info"))
    script_usec = sum(
        after[k][1] - before.get(k, (0, 0))[1]
        for k in ("cmdstat_evalsha", "cmdstat_eval")
        if k in after
    )

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    return {
        "threads": threads,
        "requests": done,
        "throughput": done / elapsed,
        "admit_p50": pct(admit_ms, 50),
        "admit_p99": pct(admit_ms, 99),
        "settle_p50": pct(settle_ms, 50),
        "settle_p99": pct(settle_ms, 99),
        "redis_per_request": round_trips / done,
        "inside_per_request": inside / done,
        "redis_usec_per_request": script_usec / done,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    user_id, key_id = setup()
    print(
        "| threads | requests | req/s | admit p50 ms | admit p99 ms | settle p50 ms "
        "| settle p99 ms | Redis round trips / request | commands run by the scripts / request "
        "| Redis server time / request |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        r = run(user_id, key_id, args.requests, threads)
        print(
            f"| {r['threads']} | {r['requests']} | {r['throughput']:.0f} | {r['admit_p50']:.2f} "
            f"| {r['admit_p99']:.2f} | {r['settle_p50']:.2f} | {r['settle_p99']:.2f} "
            f"| {r['redis_per_request']:.2f} | {r['inside_per_request']:.1f} "
            f"| {r['redis_usec_per_request']:.0f} us |"
        )
    UsageRecord.objects.filter(user__username="bench").delete()


if __name__ == "__main__":
    main()
