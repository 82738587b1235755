"""How long the admin's ledger list takes on a ledger of two million rows.

    python bench/ledger_admin.py [--rows 2000000] [--users 1000] [--repeat 5]

Uses its own PostgreSQL database (BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/tollgate_bench_ledger_admin), filled once with `--rows`
rows over the last 60 UTC days, in time order: `--users` users (a few heavy, most light),
two keys each, four models of three providers, 30% cache hits, 1% upstream errors, 0.1%
stale fallbacks, a few abandoned. Then times pages of the admin's ledger list through
Django's test client (login and template included): the list as it opens, its last linked
page, sorted by cost and by user, filtered by outcome or fallback, narrowed to last month. A
page the read deadline cuts (DATABASE_READ_TIMEOUT_MS) shows as status 500 (503 through
the deployed middleware) and is not tried again.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.dashboard import ledger_setup  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/tollgate_bench_ledger_admin"

FILL = """
INSERT INTO quotas_usagerecord
    (request_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
     cost_usd, cached, fallback, outcome, latency_ms, created_at)
SELECT 'req-' || md5(g::text),
       u.users[1 + w.i],
       u.keys[1 + 2 * w.i + g %% 2],
       (ARRAY['gpt-4o-mini', 'gpt-4o-mini', 'gpt-4o-mini', 'gpt-4o', 'gpt-4o',
              'gemini-2.0-flash', 'local/demo'])[1 + g %% 7],
       (ARRAY['openai', 'openai', 'openai', 'openai', 'openai', 'gemini', 'local'])[1 + g %% 7],
       CASE WHEN g %% 10 < 3 THEN 0 ELSE 50 + g %% 400 END,
       CASE WHEN g %% 10 < 3 THEN 0 ELSE 20 + g %% 300 END,
       CASE WHEN g %% 10 < 3 OR g %% 100 = 97 THEN 0
            ELSE ((g %% 997) / 1000000.0)::numeric(20, 12) END,
       g %% 10 < 3,
       g %% 1000 = 1,
       CASE WHEN g %% 10 < 3 THEN 'cached' WHEN g %% 100 = 97 THEN 'upstream_error'
            WHEN g %% 100000 = 5 THEN 'abandoned' ELSE 'ok' END,
       5 + g %% 50,
       now() - (1 - g::float / %(rows)s) * interval '60 days'
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT floor(%(users)s * power(((g::bigint * 7919) %% 10007) / 10007.0, 2))::int
              AS i) AS w,
     (SELECT array_agg(u.id ORDER BY u.id) AS users,
             (SELECT array_agg(k.id ORDER BY k.user_id, k.id) FROM quotas_apikey k
              JOIN auth_user ku ON ku.id = k.user_id WHERE ku.username LIKE 'bench-%%') AS keys
      FROM auth_user u WHERE u.username LIKE 'bench-%%') AS u
ORDER BY g
"""


def _fill(rows: int, users: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from quotas.models import ApiKey, UsageRecord

    if UsageRecord.objects.count() == rows:
        print(f"ledger already holds {rows:,} rows")
        return
    user_model = get_user_model()
    user_model.objects.bulk_create(
        [user_model(username=f"bench-{i}") for i in range(users)], ignore_conflicts=True
    )
    people = list(user_model.objects.filter(username__startswith="bench-").order_by("id"))
    ApiKey.objects.filter(user__in=people).delete()
    ApiKey.objects.bulk_create(
        ApiKey(user=user, name=f"k{n}", prefix=f"{user.pk * 2 + n:08x}", secret_hash="-")  # noqa: S106
        for user in people
        for n in range(2)
    )
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE quotas_usagerecord, quotas_dailyusage")
        cursor.execute(FILL, {"rows": rows, "users": users})
    print(f"filled {rows:,} ledger rows in {time.perf_counter() - started:.1f} s")


def main() -> None:
    args = ledger_setup(__doc__.splitlines()[0], fill=_fill, rows=2_000_000, database=DEFAULT_DB)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    settings.ALLOWED_HOSTS = ["*"]
    admin, _ = get_user_model().objects.get_or_create(
        username="admin-bench", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client(raise_request_exception=False)
    client.force_login(admin)
    url = "/admin/quotas/usagerecord/"
    first = client.get(url, secure=True)
    last_page = max(first.context_data["cl"].paginator.page_range)
    now = time.gmtime()  # last month: a whole month of rows
    month = (now.tm_year, now.tm_mon - 1) if now.tm_mon > 1 else (now.tm_year - 1, 12)
    pages = [
        ("the list as it opens", {}),
        ("sorted by cost (o=8)", {"o": "8"}),
        ("sorted by user (o=2)", {"o": "2"}),
        ("upstream errors (1%)", {"outcome__exact": "upstream_error"}),
        ("stale fallbacks (0.1%)", {"fallback__exact": "1"}),
        ("cache hits (30%)", {"cached__exact": "1"}),
        ("last month", {"created_at__year": month[0], "created_at__month": month[1]}),
        (f"its last linked page (p={last_page})", {"p": last_page}),
    ]
    print(f"\nledger rows: {args.rows:,}, median / max of {args.repeat} runs")
    for label, params in pages:
        samples, status = [], None
        for _ in range(args.repeat):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url, params, secure=True)
                samples.append((time.perf_counter() - started) * 1000)
            status = response.status_code
            if status >= 500:  # cut by the read deadline: the worker now holds the database
                time.sleep(2)  # until its check answers, about a second later
                break
        sql = sum(float(q["time"]) for q in queries.captured_queries) * 1000
        print(
            f"  {label:36} {statistics.median(samples):8.0f} ms / {max(samples):.0f} ms"
            f"  (status {status}, {len(queries.captured_queries)} queries, {sql:.0f} ms of SQL)"
        )


if __name__ == "__main__":
    main()
