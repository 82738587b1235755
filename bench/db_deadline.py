"""What the read deadline of config/db/deadline.py costs a query.

    .venv/bin/python bench/db_deadline.py [--calls 200000] [--queries 5000] [--rounds 5]

Two measures, each the median of --rounds rounds:

- the execute wrapper alone, around a call that does nothing: called directly, through the
  wrapper off the request path (no deadline: one ContextVar read), and through it on the
  request path (armed and disarmed: the watchdog's bookkeeping), in ns per call;
- `SELECT 1` through Django's cursor on a real connection (DATABASE_URL, default the
  local PostgreSQL's `postgres` database; nothing is written), without the wrapper in
  `connection.execute_wrappers`, with it and no deadline, and with a deadline, in µs per
  query: the wrapper's cost against a round trip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ns(fn: Any, calls: int, rounds: int) -> float:
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        fn(calls)
        per_call.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(per_call)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    os.environ.setdefault("SECRET_KEY", "bench-only")
    import django

    django.setup()
    from django.db import DEFAULT_DB_ALIAS, connections

    from config.db import deadline

    # The DatabaseWrapper itself, as Django's cursor passes it to the wrapper (the
    # `django.db.connection` proxy would add a lookup per attribute).
    connection = connections[DEFAULT_DB_ALIAS]

    connection.ensure_connection()
    context = {"connection": connection, "cursor": None}

    def nothing(sql: Any, params: Any, many: bool, ctx: Any) -> None:
        return None

    def direct(n: int) -> None:
        for _ in range(n):
            nothing("", None, False, context)

    def wrapped(n: int) -> None:
        wrapper = deadline.execute_with_deadline
        for _ in range(n):
            wrapper(nothing, "", None, False, context)

    def select_one(n: int) -> None:
        with connection.cursor() as cursor:
            for _ in range(n):
                cursor.execute("SELECT 1")

    lines = ["execute wrapper around a call that does nothing (ns per call):"]
    lines.append(f"  direct call             {_median_ns(direct, args.calls, args.rounds):8.0f}")
    lines.append(f"  wrapper, no deadline    {_median_ns(wrapped, args.calls, args.rounds):8.0f}")
    with deadline.read_deadline(5.0):
        lines.append(
            f"  wrapper, with deadline  {_median_ns(wrapped, args.calls, args.rounds):8.0f}"
        )

    lines.append("SELECT 1 through Django's cursor (us per query):")
    ours = deadline.execute_with_deadline
    connection.execute_wrappers.remove(ours)
    without = _median_ns(select_one, args.queries, args.rounds) / 1000
    connection.execute_wrappers.append(ours)
    no_deadline = _median_ns(select_one, args.queries, args.rounds) / 1000
    with deadline.read_deadline(5.0):
        armed = _median_ns(select_one, args.queries, args.rounds) / 1000
    lines.append(f"  no wrapper              {without:8.1f}")
    lines.append(f"  wrapper, no deadline    {no_deadline:8.1f}")
    lines.append(f"  wrapper, with deadline  {armed:8.1f}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
