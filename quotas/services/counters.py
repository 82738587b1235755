"""Counter maintenance: rebuilds from the ledger, the sweep of abandoned reservations,
resets and persisted refusal counts."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from quotas.engine import (
    calendar_bounds,
)
from quotas.models import ApiKey, DenialCount, Outcome, UsageRecord
from quotas.policy import Quota
from quotas.services.ledger import _window_start, ledger_usages_and_rows
from quotas.services.state import _state, backend, logger

# --- counters ------------------------------------------------------------------------------


def counters_rebuild(*, quotas: Iterable[Quota], now: float | None = None) -> int:
    """Recreate missing day/month counters of these quotas from the ledger.

    Returns how many counters were created (0 when another worker was first).
    """
    moment = time.time() if now is None else now
    _, day_end, _, month_end = calendar_bounds(moment)
    calendar = [q for q in quotas if q.window in ("day", "month")]
    if not calendar:
        return 0
    be = backend()
    # Under the principals' ledger locks, those a fail-open admission holds from its read of
    # the ledger to the commit of its pending row (`_ledger_admit`): a row still being
    # written when Redis came back is waited for, so that it is counted here; one that
    # would come after sees its worker back on Redis and is admitted there instead. The
    # counters are created before the locks are let go.
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                for counter in sorted({q.counter for q in calendar}):
                    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"tg:{counter}"])
        entries: dict[str, tuple[str, int, int, int, int]] = {}
        spots = {quota: (quota.counter, _window_start(quota, moment)) for quota in calendar}
        # Requests in flight since the epoch began are taken in by the new counters, but
        # those whose rows the ledger sums hold already: both read in one statement, so
        # that a row committed meanwhile is counted once, through the ledger or not at all
        # there (its settlement then reaches the new counter).
        epoch = _state.epoch
        usages, present = ledger_usages_and_rows(spots.values(), be.carried(epoch))
        in_ledger = sorted(present)
        for quota in calendar:
            key = be.counter_key(quota, epoch, moment)
            if key in entries:
                continue
            requests, tokens, micros = usages[spots[quota]]
            end = day_end if quota.window == "day" else month_end
            ttl = int(end.timestamp() - moment) + 3600
            entries[key] = (key, requests, tokens, micros, ttl)
        created = be.init_calendar(list(entries.values()), in_ledger, epoch=epoch)
    if created:
        logger.info("rebuilt %d calendar counters from the ledger", created)
    return created


def counters_rebuild_all() -> None:
    """Make every day and month counter rebuild from the ledger before its next use."""
    backend().rotate_epoch()


def reservations_sweep(*, now: float | None = None) -> int:
    """Refund reservations abandoned by crashed workers (their lease expired), and mark
    abandoned the ledger rows such workers left pending (`pending_rows_abandon`)."""
    moment = time.time() if now is None else now
    return pending_rows_abandon(now=moment) + backend().sweep(now=moment)


def pending_rows_abandon(*, now: float | None = None) -> int:
    """A request admitted in fail-open writes its ledger row at once, pending, with its
    estimate, which its settlement replaces. A row still pending twice the lease's life
    later lost its worker: it becomes `abandoned`, with nothing charged, and stops counting
    against any budget. A settlement that comes later still (a worker only very slow)
    writes the actual usage over it."""
    moment = time.time() if now is None else now
    cutoff = datetime.fromtimestamp(moment - 2 * settings.QUOTA_LEASE_TTL, tz=UTC)
    abandoned = UsageRecord.objects.filter(outcome=Outcome.PENDING, created_at__lt=cutoff).update(
        outcome=Outcome.ABANDONED, prompt_tokens=0, completion_tokens=0, cost_usd=Decimal(0)
    )
    if abandoned:
        logger.warning("%d pending ledger rows abandoned by their workers", abandoned)
    return abandoned


def quota_reset_windows(*, user_id: int) -> int:
    """Clear a user's current windows (sliding, calendar, leases) and those of their keys.

    Calendar counters rebuild from the ledger on the next request, so this forgives the
    minute and hour windows and any in-flight leases; day and month budgets stay true.
    """
    deleted = backend().reset_counters(counter=f"u:{user_id}")
    for key_id in ApiKey.objects.filter(user_id=user_id).values_list("id", flat=True):
        deleted += backend().reset_counters(counter=f"k:{key_id}")
    return deleted


def denials_persist(*, day: date | None = None) -> int:
    """Copy the day's live refusal counts from the quota backend into DenialCount."""
    day = day or timezone.now().date()
    counts = backend().denials(day=day.strftime("%Y%m%d"))
    for name, count in counts.items():
        scope, _, dimension = name.partition("|")
        DenialCount.objects.update_or_create(
            day=day, scope=scope, dimension=dimension, defaults={"count": count}
        )
    return len(counts)
