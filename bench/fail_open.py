"""How long a fail-open admission reads the ledger, with a million ledger rows.

    python bench/fail_open.py [--rows 1000000] [--users 1000] [--repeat 5]

While Redis is unreachable, an admission checks the token and cost budgets against the
ledger (`ledger_usages`, one statement for every window of every scope), holding the
advisory locks of its principals, the global one included: every other fail-open
admission waits for that statement. Uses the ledger of bench/dashboard.py
(BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/tollgate_bench_dashboard;
`--rows` rows over the last 30 days for `--users` users), and times the read of one
user's usual windows, at the end of a 30-day month: the key's minute, the user's minute,
day and month, the global hour and day, read whole, then as a fail-open admission reads
them (`ledger_usages_failopen`: the global day's rows older than a few seconds kept
summed by the process). Prints the whole read's plan.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.dashboard import _timed, ledger_setup  # noqa: E402


def main() -> None:
    args = ledger_setup(__doc__.splitlines()[0])
    import datetime as dt

    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from quotas.services.ledger import ledger_usages, ledger_usages_failopen

    user = get_user_model().objects.get(username=f"bench-{args.users // 2}")
    now = dt.datetime.now(tz=dt.UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day - dt.timedelta(days=29)  # the month's last day: its whole ledger counts
    spots = [
        ("k:1", now - dt.timedelta(minutes=1)),
        (f"u:{user.pk}", now - dt.timedelta(minutes=1)),
        (f"u:{user.pk}", day),
        (f"u:{user.pk}", month),
        ("g", now - dt.timedelta(hours=1)),
        ("g", day),
    ]
    usages = ledger_usages(spots)
    median, worst = _timed(lambda: ledger_usages(spots), args.repeat)
    with CaptureQueriesContext(connection) as queries:
        ledger_usages(spots)
    (statement,) = queries.captured_queries
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + statement["sql"])
        plan = "\n".join(f"    {row[0]}" for row in cursor.fetchall())

    # As an admission reads them: the global day's older rows kept summed by the process.
    moment, calendar = now.timestamp(), [spots[5]]
    assert ledger_usages_failopen(spots, calendar=calendar, now=moment) == usages
    assert ledger_usages_failopen(spots, calendar=calendar, now=moment + 1) == usages
    kept_median, kept_worst = _timed(
        lambda: ledger_usages_failopen(spots, calendar=calendar, now=moment + 1), args.repeat
    )

    print(f"\nledger rows: {args.rows:,} over 30 days, {args.users} users")
    print(f"  fail-open ledger read, {len(spots)} windows: {median:.1f} ms (max {worst:.1f} ms)")
    print(
        f"  the same, the global day's older rows kept summed: {kept_median:.1f} ms "
        f"(max {kept_worst:.1f} ms)"
    )
    print(f"  the user's month: {usages[spots[3]]}; the global day: {usages[spots[5]]}")
    print(f"  plan:\n{plan}")


if __name__ == "__main__":
    main()
