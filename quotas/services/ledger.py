"""The usage ledger: rows of settled requests and cache hits (the latter batched), and the
ledger sums that rebuild counters and back fail-open admission."""

from __future__ import annotations

import atexit
import functools
import operator
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    models,
)
from django.db.models import Count, Max, Q, Subquery, Sum, Value

from config.db.deadline import DatabaseNotAnswering, deadline_at_most, read_deadline
from config.outages import Outage
from health import metrics
from quotas.engine import (
    calendar_bounds,
)
from quotas.models import Outcome, UsageRecord
from quotas.policy import Policy, Quota, usd_to_micros
from quotas.services.spool import spool_append, spool_pending, spool_replay
from quotas.services.state import logger

if TYPE_CHECKING:
    from quotas.services.admission import Admission


COUNTED_OUTCOMES = (Outcome.OK, Outcome.CACHED, Outcome.PENDING)


def _latency(admission: Admission, latency_ms: int | None) -> int:
    if latency_ms is not None:
        return max(0, int(latency_ms))
    return int((time.monotonic() - admission.started) * 1000)


def _ledger_filter(counter: str) -> Q:
    kind, _, rest = counter.partition(":")
    if kind == "u":
        return Q(user_id=int(rest))
    if kind == "k":
        return Q(api_key_id=int(rest))
    if kind == "p":
        provider, _, model = rest.partition(":")
        return Q(provider=provider) if model == "*" else Q(provider=provider, model=model)
    return Q()


def _window_start(quota: Quota, now: float) -> datetime:
    day_start, _, month_start, _ = calendar_bounds(now)
    if quota.window == "day":
        return day_start
    if quota.window == "month":
        return month_start
    return datetime.fromtimestamp(now - int(quota.window), tz=UTC)


def ledger_usage(*, counter: str, since: datetime) -> tuple[int, int, int]:
    """(requests, tokens, micro-USD) the ledger holds for a principal since `since`, as the
    counters count them: a stale copy served because a quota refused is not a request
    there (the refusal consumed nothing), so it is not one here either."""
    return ledger_usages([(counter, since)])[(counter, since)]


def ledger_usages(
    spots: Iterable[tuple[str, datetime]],
) -> dict[tuple[str, datetime], tuple[int, int, int]]:
    """`ledger_usage` of several (counter, since) pairs in one statement, each principal's
    rows read from its own earliest `since` on and summed once per pair.

    A fail-open admission holds its principals' ledger locks while it reads, the global
    one included, so this statement is what every other fail-open admission waits for.
    Each principal's rows are bounded by its own window: a user's month and the global
    day read that user's month and everyone's day (one index scan each), not everyone's
    month (bench/fail_open.py)."""
    return ledger_usages_and_rows(spots, ())[0]


def ledger_usages_and_rows(
    spots: Iterable[tuple[str, datetime]], request_ids: Sequence[str]
) -> tuple[dict[tuple[str, datetime], tuple[int, int, int]], set[str]]:
    """`ledger_usages`, and which of `request_ids` have a ledger row (of any outcome), read
    in the same statement on PostgreSQL: a row committed meanwhile is either in both or in
    neither (a counter rebuild adds the requests in flight whose rows are not in its sums).
    Elsewhere, the rows are looked up first, in a statement of their own."""
    wanted = list(dict.fromkeys(spots))
    ids = list(dict.fromkeys(request_ids))
    together = bool(ids) and connection.vendor == "postgresql"
    present: set[str] = set()
    if ids and not together:
        present = set(
            UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True)
        )
    if not wanted:
        if together:
            present = set(
                UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True)
            )
        return {}, present
    sums: dict[str, Any] = {}
    principals = [_ledger_filter(counter) for counter, _ in wanted]
    earliest: dict[str, datetime] = {}
    for counter, since in wanted:
        earliest[counter] = min(since, earliest.get(counter, since))
    counted = Q(outcome__in=COUNTED_OUTCOMES, fallback=False)
    every = counted & functools.reduce(
        operator.or_,
        (_ledger_filter(counter) & Q(created_at__gte=since) for counter, since in earliest.items()),
    )
    for i, (principal, (_, since)) in enumerate(zip(principals, wanted, strict=True)):
        mine = counted & principal & Q(created_at__gte=since)
        sums[f"r{i}"] = Count("id", filter=mine)
        sums[f"p{i}"] = Sum("prompt_tokens", filter=mine)
        sums[f"c{i}"] = Sum("completion_tokens", filter=mine)
        sums[f"u{i}"] = Sum("cost_usd", filter=mine)
    if together:
        from django.contrib.postgres.aggregates import ArrayAgg

        ours = Q(request_id__in=ids)
        every |= ours
        sums["present"] = ArrayAgg("request_id", filter=ours, distinct=True, default=Value([]))
    row = UsageRecord.objects.filter(every).aggregate(**sums)
    if together:
        present = set(row["present"])
    return {
        spot: (
            int(row[f"r{i}"]),
            int(row[f"p{i}"] or 0) + int(row[f"c{i}"] or 0),
            usd_to_micros(row[f"u{i}"] or Decimal(0)),
        )
        for i, spot in enumerate(wanted)
    }, present


# A fail-open admission's read of a calendar window (day, month) of a broad scope: the
# rows older than a cut, a few seconds back, are summed once every `_OLDER_KEPT_SECONDS` by
# each process and kept, with the highest row id then; afterwards only the rows since the
# cut, and those written since (an id above the kept one, whatever their time: a row
# replayed from the spool), are read. A row is committed within `_SETTLED_SECONDS` of its
# `created_at` (the request path's INSERT waits at most LEDGER_WRITE_TIMEOUT_MS), so the
# kept sums miss a row only if it was being written, with a time older than the cut, at
# the very moment they were read; and only until they are read again.
_OLDER_KEPT_SECONDS = 5.0
_SETTLED_SECONDS = 5.0
_OLDER_KEPT_MAX = 1000


def ledger_usages_failopen(
    spots: Iterable[tuple[str, datetime]], *, calendar: Iterable[tuple[str, datetime]], now: float
) -> dict[tuple[str, datetime], tuple[int, int, int]]:
    """`ledger_usages` for a fail-open admission, in one statement as well, but for the
    `calendar` spots (a day or month window: its start does not move) whose older rows this
    process summed less than `_OLDER_KEPT_SECONDS` ago: those are the kept sums plus the
    rows since their cut or written since. With a global day budget every fail-open
    admission of every user waits for this read (the global lock), so it reads the last
    seconds of everyone's rows, not the whole day (bench/fail_open.py)."""
    from quotas.services.state import _state

    kept = _state.ledger_older
    calendar = set(calendar)
    cut = datetime.fromtimestamp(now - _SETTLED_SECONDS, tz=UTC)
    terms: dict[tuple[str, datetime], Q] = {}  # the rows each spot sums
    finds: dict[tuple[str, datetime], Q] = {}  # how the statement finds them
    using: dict[tuple[str, datetime], tuple[datetime, float, int, tuple[int, int, int]]] = {}
    renewed: set[tuple[str, datetime]] = set()
    for spot in dict.fromkeys(spots):
        counter, since = spot
        principal = _ledger_filter(counter)
        older = kept.get(spot) if spot in calendar else None
        if older is not None and now - older[1] < _OLDER_KEPT_SECONDS:
            using[spot] = older  # as read here: another thread may replace it meanwhile
            terms[spot] = principal & (
                Q(created_at__gte=older[0]) | Q(id__gt=older[2], created_at__gte=since)
            )
            # The rows are found by time or by id, each through its own index (with the
            # window's start in this condition too, the day's index was scanned whole).
            finds[spot] = principal & (Q(created_at__gte=older[0]) | Q(id__gt=older[2]))
            continue
        terms[spot] = finds[spot] = principal & Q(created_at__gte=since)
        if spot in calendar and since < cut:
            renewed.add(spot)
    if not terms:
        return {}
    sums: dict[str, Any] = {}
    for i, (spot, mine) in enumerate(terms.items()):
        parts = [("", mine)]
        if spot in renewed:
            parts.append(("o", mine & Q(created_at__lt=cut)))
        for tag, rows in parts:
            sums[f"{tag}r{i}"] = Count("id", filter=rows)
            sums[f"{tag}p{i}"] = Sum("prompt_tokens", filter=rows)
            sums[f"{tag}c{i}"] = Sum("completion_tokens", filter=rows)
            sums[f"{tag}u{i}"] = Sum("cost_usd", filter=rows)
    if renewed:  # the ledger's highest id, in the same snapshot as the sums
        sums["last"] = Max(Subquery(UsageRecord.objects.order_by("-id").values("id")[:1]))
    row = (
        UsageRecord.objects.filter(functools.reduce(operator.or_, finds.values()))
        .filter(outcome__in=COUNTED_OUTCOMES, fallback=False)
        .aggregate(**sums)
    )

    def read(tag: str, i: int) -> tuple[int, int, int]:
        return (
            int(row[f"{tag}r{i}"]),
            int(row[f"{tag}p{i}"] or 0) + int(row[f"{tag}c{i}"] or 0),
            usd_to_micros(row[f"{tag}u{i}"] or Decimal(0)),
        )

    found: dict[tuple[str, datetime], tuple[int, int, int]] = {}
    for i, spot in enumerate(terms):
        found[spot] = read("", i)
        if spot in renewed and row["last"] is not None:  # None: no rows to keep
            if len(kept) >= _OLDER_KEPT_MAX:  # windows of days gone by
                kept.clear()
            kept[spot] = (cut, now, int(row["last"]), read("o", i))
        elif spot in using:
            (r, t, c), (r2, t2, c2) = using[spot][3], found[spot]
            found[spot] = (r + r2, t + t2, c + c2)
    return found


def _ledger_write(
    *,
    admission: Admission,
    prompt_tokens: int,
    completion_tokens: int,
    cost: Decimal,
    outcome: str,
    cached: bool,
    fallback: bool,
    latency_ms: int,
) -> None:
    policy = admission.policy
    # Admitted in fail-open, the request has a pending row: this one replaces it
    # (`_ledger_conflict`), or waits in the spool to, as any row the database cannot take.
    _insert_or_keep(
        _row(
            request_id=admission.request_id,
            user_id=policy.user_id,
            api_key_id=policy.key_id,
            model=policy.model,
            provider=policy.provider,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            cached=cached,
            fallback=fallback,
            outcome=outcome,
            latency_ms=latency_ms,
            created_at=datetime.fromtimestamp(admission.at, tz=UTC),
        )
    )


@functools.cache
def _ledger_columns(vendor: str) -> tuple[str, tuple[tuple[str, Any, bool], ...]]:
    """`INSERT INTO <ledger> (<columns>) VALUES`, and per column its attribute name, its
    field and whether its value needs the database's preparation (decimals, datetimes).
    Built once from the model."""
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(str(f.column)) for f in fields)
    # Names from the model's meta, quoted; the values are parameters.
    head = f"INSERT INTO {quote(UsageRecord._meta.db_table)} ({columns}) VALUES "  # noqa: S608
    prep = (models.DecimalField, models.DateTimeField)
    return head, tuple((f.attname, f, isinstance(f, prep)) for f in fields)


def _row(**values: Any) -> list[Any]:
    """The INSERT parameters of one ledger row (the model's defaults for what is not
    given), without building a model instance: the hot path writes one
    per request."""
    _, columns = _ledger_columns(connection.vendor)
    params = []
    for name, field, prepared in columns:
        value = values[name] if name in values else field.get_default()
        params.append(field.get_db_prep_save(value, connection) if prepared else value)
    return params


# What a request's settlement writes over the pending row its fail-open admission wrote
# (or over that row abandoned by the sweep, its worker taken for dead).
_SETTLED_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cached",
    "fallback",
    "outcome",
    "latency_ms",
)


@functools.cache
def _ledger_conflict(vendor: str) -> str:
    """The ledger INSERT's ON CONFLICT clause: a row whose request id is there already is
    left as it is (a retry, a replay of the spool), unless that row is the pending one of a
    fail-open admission (or that row abandoned): the settled row replaces it. So a
    settlement is one INSERT whichever way its request was admitted, spooled like any other
    when the database cannot take it."""
    quote = connection.ops.quote_name
    table = quote(UsageRecord._meta.db_table)
    sets = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in _SETTLED_COLUMNS)
    unsettled = ", ".join(f"'{o}'" for o in (Outcome.PENDING, Outcome.ABANDONED))
    return (
        f" ON CONFLICT ({quote('request_id')}) DO UPDATE SET {sets}"
        f" WHERE {table}.{quote('outcome')} IN ({unsettled})"
    )


def _ledger_sql(rows: int) -> str:
    head, columns = _ledger_columns(connection.vendor)
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return head + ", ".join([one] * rows) + _ledger_conflict(connection.vendor)


def _ledger_insert(params: list[Any]) -> None:
    """INSERT one ledger row unless its request id is already there. One statement, so one
    round trip in autocommit mode, where bulk_create(ignore_conflicts=True) adds a BEGIN
    and a COMMIT around it."""
    _execute(_ledger_sql(1), params)


def _execute(sql: str, params: list[Any]) -> None:
    """Run one ledger INSERT; on a connection the server dropped (a restart since the
    request's health check, config/db/base.py), once more on a new one. ON CONFLICT DO
    NOTHING makes the retry harmless if the first attempt did land. Not after a server that
    did not answer (config/db/deadline.py): a new connection would not be answered either."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
    except DatabaseNotAnswering:
        raise
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        logger.warning("ledger insert retried on a new connection")
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


# --- cache-hit ledger rows (batched) -----------------------------------------------------

HIT_BATCH_ROWS = 500  # rows per INSERT of the batched cache-hit rows
HIT_BACKLOG_MAX = 200_000  # rows kept in memory if the spool cannot be written (~65 MB)
_hit_queue: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()
# Held while rows taken from the queue are being written (or kept): the exit waits for it.
_draining = threading.Lock()


def usage_flush() -> int:
    """Write the queued cache-hit rows now (multi-row INSERTs), then the rows of the spool
    (`quotas.services.spool`); the number written.

    A row the database can never take (a user or key deleted meanwhile: IntegrityError,
    DataError) is dropped and logged, the rest of its batch written one by one. Queued rows
    that cannot be written now (the database unreachable, busy, mid-migration) go to the
    spool for the next flush, and the error is raised."""
    with _draining:
        written = _drain_queue()
    spooled = [0]

    def write(batch: list[dict[str, Any]]) -> None:
        done = _write_rows([_row_from_spool(values) for values in batch])
        metrics.LEDGER_SPOOL_ROWS.labels("written").inc(done)
        spooled[0] += done

    spool_replay(write)
    return written + spooled[0]


def _drain_queue() -> int:
    """Write the queued rows, or keep those the database cannot take now; the number
    written. With `_draining` held: rows taken from the queue are in no other place until
    they are written or spooled."""
    rows: list[list[Any]] = []
    while True:
        try:
            rows.append(_hit_queue.get_nowait())
        except queue.Empty:
            break
    written = 0
    for start in range(0, len(rows), HIT_BATCH_ROWS):
        try:
            written += _write_rows(rows[start : start + HIT_BATCH_ROWS])
        except Exception:
            _keep_for_later(rows[start:])
            raise
    return written


def _write_rows(rows: list[list[Any]]) -> int:
    """One multi-row INSERT of `rows`, or one by one if the database refuses a row of them
    for good (those are dropped and logged); the number written. A request id twice among
    them (a row both queued and spooled) is written once: an INSERT may not update the same
    row twice."""
    if len(rows) > 1:
        rows = list({row[_request_id_index()]: row for row in rows}.values())
    try:
        _execute(_ledger_sql(len(rows)), [v for row in rows for v in row])
    except _REFUSED:
        return sum(_insert_or_drop(row) for row in rows)
    return len(rows)


def _request_id_index() -> int:
    _, columns = _ledger_columns(connection.vendor)
    return next(i for i, (name, _, _) in enumerate(columns) if name == "request_id")


_REFUSED = (IntegrityError, DataError)  # what a row itself makes impossible


def _insert_or_drop(row: list[Any]) -> int:
    """INSERT one row; 0 and an error in the log if the database refuses that row."""
    try:
        _ledger_insert(row)
    except _REFUSED:
        logger.exception("ledger row dropped: the database refuses it")
        return 0
    return 1


def _keep_for_later(rows: list[list[Any]]) -> None:
    """Rows the database cannot take now: to the spool, where a killed worker does not lose
    them; to the queue, keeping at most HIT_BACKLOG_MAX, if the spool cannot be written."""
    _flusher_ensure()
    spooled = spool_append([_row_to_spool(row) for row in rows])
    metrics.LEDGER_SPOOL_ROWS.labels("kept").inc(spooled)
    rows = rows[spooled:]
    dropped = min(len(rows), max(0, len(rows) + _hit_queue.qsize() - HIT_BACKLOG_MAX))
    if dropped:
        logger.error("cache-hit ledger backlog full: %d rows dropped", dropped)
    for row in rows[dropped:]:
        _hit_queue.put(row)


def _row_to_spool(row: list[Any]) -> dict[str, Any]:
    _, columns = _ledger_columns(connection.vendor)
    return {name: value for (name, _, _), value in zip(columns, row, strict=True)}


def _row_from_spool(values: dict[str, Any]) -> list[Any]:
    """The INSERT parameters of a spooled row; a column added since it was spooled takes
    its default."""
    _, columns = _ledger_columns(connection.vendor)
    params = []
    for name, field, prepared in columns:
        if name in values:
            params.append(values[name])
        else:
            default = field.get_default()
            params.append(field.get_db_prep_save(default, connection) if prepared else default)
    return params


def _flush_forever(interval: float) -> None:
    while True:
        time.sleep(interval)
        _flush_once()


def _flush_once() -> None:
    """One flush of the flusher thread. Its queries have a request's read deadline: a hung
    server does not hold the flusher (and the spool segments it has locked) for as long
    as it hangs; the rows wait in the spool for the next flush."""
    from django.db import close_old_connections

    try:
        with read_deadline(settings.DATABASE_READ_TIMEOUT):
            usage_flush()
    except DatabaseError as exc:  # an outage: one line a second, not a traceback
        logger.warning("ledger flush failed, rows wait in the spool: %s", exc)
    except Exception:
        logger.exception("ledger flush failed")
    finally:
        close_old_connections()


def _enqueue(row: list[Any]) -> None:
    """Queue a row for the next batched INSERT (at once with USAGE_HIT_BATCH_SECONDS=0)."""
    if float(getattr(settings, "USAGE_HIT_BATCH_SECONDS", 1.0)) <= 0:
        _insert_or_keep(row)
        return
    _keep(row)


# After an INSERT the database could not take, rows go straight to the spool for a second
# before the database is asked again.
_database_away = Outage(
    logger,
    began="ledger rows kept for a later flush, the database is unavailable: %s",
    ended="ledger rows written to the database again after %.1f s",
)


def _insert_or_keep(row: list[Any]) -> None:
    """INSERT a ledger row now; if the database cannot take it now, keep it for a later
    flush rather than lose it (the request it records has been served, and charged in
    Redis). A row the database refuses for good is dropped and logged (`_insert_or_drop`).
    On the request path it waits at most LEDGER_WRITE_TIMEOUT_MS for the database: a row
    kept for later costs nothing, a request held by a hung server does."""
    if _database_away.away() and not connection.in_atomic_block:
        _keep_for_later([row])
        return
    try:
        with deadline_at_most(settings.LEDGER_WRITE_TIMEOUT):
            _insert_or_drop(row)
    except DatabaseError as exc:
        if connection.in_atomic_block:
            raise
        _database_away.failed(exc)
        _keep_for_later([row])
        return
    _database_away.answered()


def _keep(row: list[Any]) -> None:
    _hit_queue.put(row)
    _flusher_ensure()


def _flusher_ensure() -> None:
    """Start this process's flusher thread unless it runs. It flushes every
    USAGE_HIT_BATCH_SECONDS; with hit rows written at once (0), it is started only once rows
    are spooled, and replays the spool every LEDGER_SPOOL_REPLAY_SECONDS. Neither (both 0,
    as in tests): no thread, the next usage_flush() writes the rows."""
    global _flusher  # noqa: PLW0603
    interval = float(getattr(settings, "USAGE_HIT_BATCH_SECONDS", 1.0))
    if interval <= 0:
        interval = float(getattr(settings, "LEDGER_SPOOL_REPLAY_SECONDS", 1.0))
    if interval <= 0:
        return
    if _flusher is None or not _flusher.is_alive():
        with _flusher_lock:
            if _flusher is None or not _flusher.is_alive():
                _flusher = threading.Thread(
                    target=_flush_forever, args=(interval,), name="usage-flush", daemon=True
                )
                _flusher.start()


def ledger_spool_adopt() -> None:
    """At a worker's start: if the spool holds rows (of a worker killed before it could
    write them), start the flusher that writes them."""
    if spool_pending():
        _flusher_ensure()


def usage_flush_at_exit() -> None:
    """At a worker's graceful exit (gunicorn's after SIGTERM or max_requests, a Celery pool
    process's): the queued rows written, or spooled if the database cannot take them.

    It first waits for the rows the flusher thread has taken from the queue to be written
    or spooled (its queries have the read deadline): that thread dies with the process, and
    the rows in its hands with it. It then keeps the flusher from taking more. Its own
    writes get the read deadline too: a hung server does not hold the exit until the
    process is killed, with the rows still in memory."""
    _draining.acquire()  # for good: the process is ending
    if _hit_queue.empty():
        return
    try:
        with read_deadline(settings.DATABASE_READ_TIMEOUT):
            _drain_queue()
    except DatabaseError as exc:
        logger.warning("ledger flush at exit failed, rows wait in the spool: %s", exc)


atexit.register(usage_flush_at_exit)


def _after_fork_in_child() -> None:
    """A forked child has no flusher thread: a lock that thread held stays free in it."""
    global _draining  # noqa: PLW0603
    _draining = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def usage_record_hit(
    *, admission: Admission, latency_ms: int | None = None, fallback: bool = False
) -> None:
    """The ledger row of a cache hit (no tokens, no money), written at most a second late."""
    policy = admission.policy
    if admission.backend == "degraded":
        # Its row was written, counted, at admission; what is left is bookkeeping.
        try:
            UsageRecord.objects.filter(request_id=admission.request_id).update(
                latency_ms=_latency(admission, latency_ms), fallback=fallback
            )
        except DatabaseError as exc:
            logger.warning("latency of cache hit %s not recorded: %s", admission.request_id, exc)
        return
    _enqueue(
        _row(
            request_id=admission.request_id,
            user_id=policy.user_id,
            api_key_id=policy.key_id,
            model=policy.model,
            provider=policy.provider,
            cached=True,
            fallback=fallback,
            outcome=Outcome.CACHED,
            latency_ms=_latency(admission, latency_ms),
            created_at=datetime.fromtimestamp(admission.at, tz=UTC),
        )
    )


def usage_record_fallback(
    *, policy: Policy, user_id: int, key_id: int | None, request_id: str, latency_ms: int
) -> None:
    """The ledger row of a stale answer served because a quota was exhausted."""
    metrics.STALE_FALLBACKS.inc()
    _enqueue(
        _row(
            request_id=request_id,
            user_id=user_id,
            api_key_id=key_id,
            model=policy.model,
            provider=policy.provider,
            cached=True,
            fallback=True,
            outcome=Outcome.CACHED,
            latency_ms=max(0, latency_ms),
        )
    )
