"""How long the operator's dashboard takes with a million ledger rows.

    python bench/dashboard.py [--rows 1000000] [--users 1000] [--repeat 5]

Uses its own PostgreSQL database (BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/tollgate_bench_dashboard), fills the ledger once with
`--rows` rows spread over the last 30 UTC days (30% cache hits), then times:
  1. the dashboard's queries with no daily roll-up (every day summed from the ledger),
  2. the daily roll-up of the 29 past days (the periodic task's work),
  3. the dashboard's queries with the roll-up in place (the normal case),
  4. the whole admin page (login, queries, template, SVG) through Django's test client.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import ensure_database  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/tollgate_bench_dashboard"


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(median, max) wall time in ms over `repeat` runs."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def _fill(rows: int, users: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from quotas.models import UsageRecord

    if UsageRecord.objects.count() == rows:
        print(f"ledger already holds {rows:,} rows")
        return
    user_model = get_user_model()
    existing = user_model.objects.filter(username__startswith="bench-").count()
    user_model.objects.bulk_create(
        [user_model(username=f"bench-{i}") for i in range(existing, users)]
    )
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE quotas_usagerecord, quotas_dailyusage")
        cursor.execute(
            """
            INSERT INTO quotas_usagerecord
                (request_id, user_id, api_key_id, model, provider, prompt_tokens,
                 completion_tokens, cost_usd, cached, fallback, outcome, latency_ms, created_at)
            SELECT 'bench-' || g,
                   u.ids[1 + (g::bigint * 7919) %% array_length(u.ids, 1)],
                   NULL, 'local/demo', 'local',
                   CASE WHEN g %% 10 < 3 THEN 0 ELSE 50 + g %% 400 END,
                   CASE WHEN g %% 10 < 3 THEN 0 ELSE 20 + g %% 300 END,
                   CASE WHEN g %% 10 < 3 THEN 0 ELSE ((g %% 997) / 1000000.0)::numeric(14,6) END,
                   g %% 10 < 3, false, CASE WHEN g %% 10 < 3 THEN 'cached' ELSE 'ok' END,
                   5 + g %% 50,
                   now() - ((g::float / %s) * interval '30 days')
            FROM generate_series(1, %s) AS g,
                 (SELECT array_agg(id) AS ids FROM auth_user
                  WHERE username LIKE 'bench-%%') AS u
            """,
            [rows, rows],
        )
        cursor.execute("ANALYZE quotas_usagerecord")
    print(f"filled {rows:,} ledger rows in {time.perf_counter() - started:.1f} s")


def ledger_setup(
    description: str,
    *,
    fill: Callable[[int, int], None] | None = None,
    rows: int = 1_000_000,
    database: str = DEFAULT_DB,
) -> argparse.Namespace:
    """The command line of a ledger benchmark (`--rows`, `--users`, `--repeat`), and Django
    set up on its own database (BENCH_DATABASE_URL, else `database`) with the ledger filled
    (once) to `--rows` rows by `fill` (this module's `_fill` by default), vacuumed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    url = os.environ.get("BENCH_DATABASE_URL", database)
    ensure_database(url)
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    (fill or _fill)(args.rows, args.users)
    from django.db import connection

    with connection.cursor() as cursor:  # the visibility map and statistics of a settled table
        cursor.execute("VACUUM ANALYZE quotas_usagerecord")
    return args


def main() -> None:
    args = ledger_setup(__doc__.splitlines()[0])
    import datetime as dt

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from health import selectors
    from quotas.rollups import usage_rollup

    today = timezone.now().date()

    from quotas.models import DailyUsage

    DailyUsage.objects.all().delete()
    cold = _timed(lambda: selectors.dashboard_overview(now=timezone.now()), args.repeat)
    started = time.perf_counter()
    for offset in range(1, 30):
        usage_rollup(day=today - dt.timedelta(days=offset))
    rollup_ms = (time.perf_counter() - started) * 1000
    warm = _timed(lambda: selectors.dashboard_overview(now=timezone.now()), args.repeat)

    settings.ALLOWED_HOSTS = ["*"]
    admin, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin)

    def page() -> None:
        response = client.get("/admin/dashboard/", secure=True)
        assert response.status_code == 200, response.status_code

    page_times = _timed(page, args.repeat)
    with connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN SELECT user_id, count(*), sum(cost_usd) FROM quotas_usagerecord "
            "WHERE created_at >= %s AND user_id IS NOT NULL GROUP BY user_id",
            [dt.datetime.combine(today, dt.time.min, tzinfo=dt.UTC)],
        )
        plan = "\n".join(f"    {row[0]}" for row in cursor.fetchall())

    print(
        f"\nledger rows: {args.rows:,} over 30 days, {args.users} users, "
        f"median/max of {args.repeat} runs"
    )
    print(f"  dashboard queries, no roll-up (ledger only) : {cold[0]:8.1f} ms / {cold[1]:.1f} ms")
    print(f"  roll-up of 29 past days (periodic task)      : {rollup_ms:8.1f} ms once")
    print(f"  dashboard queries, with roll-up              : {warm[0]:8.1f} ms / {warm[1]:.1f} ms")
    print(
        f"  whole admin page (HTML + SVG), with roll-up  : "
        f"{page_times[0]:8.1f} ms / {page_times[1]:.1f} ms"
    )
    print(f"  plan of today's top-users query:\n{plan}")


if __name__ == "__main__":
    main()
