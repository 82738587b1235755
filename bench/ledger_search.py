"""How long a search of the ledger's admin list takes with a million ledger rows.

    python bench/ledger_search.py [--rows 1000000] [--users 1000] [--repeat 5]

Uses the ledger of bench/dashboard.py (BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/tollgate_bench_dashboard; filled once with `--rows` rows
for `--users` users named bench-0.., request ids bench-1..), then times the admin's ledger
list (login, queries, template) through Django's test client for three searches:
  1. a full request id (one row),
  2. the start of a request id (the client's own id: 11 rows),
  3. a username (its ~1,000 rows; the term also starts 1,111 request ids),
and prints the slowest SQL statement of each page with its EXPLAIN ANALYZE.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.dashboard import _timed, ledger_setup  # noqa: E402


def main() -> None:
    args = ledger_setup(__doc__.splitlines()[0])
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    settings.ALLOWED_HOSTS = ["*"]
    admin, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin)
    middle = args.rows // 2
    searches = [
        ("full request id", f"bench-{middle}"),
        ("request id prefix", f"bench-{middle // 10}"),
        ("username", f"bench-{args.users - 1}"),
    ]

    print(f"\nledger rows: {args.rows:,}, {args.users} users, median/max of {args.repeat} runs")
    for label, term in searches:

        def page(term: str = term) -> int:
            response = client.get("/admin/quotas/usagerecord/", {"q": term}, secure=True)
            assert response.status_code == 200, response.status_code
            return len(response.context_data["cl"].result_list)

        listed = page()
        median, worst = _timed(page, args.repeat)
        with CaptureQueriesContext(connection) as queries:
            page()
        slowest = max(queries.captured_queries, key=lambda q: float(q["time"]))
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {slowest['sql']}")  # noqa: S608
            plan = "\n".join(f"      {row[0]}" for row in cursor.fetchall())
        times = [float(q["time"]) * 1000 for q in queries.captured_queries]
        print(
            f"  {label:18} q={term!r:16}: {median:8.1f} ms / {worst:.1f} ms, "
            f"{listed} rows listed, {len(times)} queries, {sum(times):.0f} ms of SQL "
            f"({', '.join(f'{t:.0f}' for t in times)})"
        )
        print(f"    slowest query ({max(times):.1f} ms): {slowest['sql'][-400:]}")
        print(f"    its plan:\n{plan}")


if __name__ == "__main__":
    main()
