"""Periodic quota tasks (scheduled by CELERY_BEAT_SCHEDULE in config/settings.py).

Each task calls one service and is safe to run twice: roll-ups replace a day's rows,
alerts are unique per threshold and period, the sweep only refunds what has expired,
denial counts are overwritten.
"""

from __future__ import annotations

import datetime as dt

from celery import shared_task
from django.utils import timezone


@shared_task(name="quotas.tasks.usage_rollup", time_limit=600, soft_time_limit=540)
def usage_rollup(day: str | None = None) -> int:
    """Roll the ledger up into DailyUsage: the given ISO day, else today, yesterday and any
    earlier day that got rows since the last runs (`usage_rollup_due`)."""
    from quotas.rollups import usage_rollup as rollup
    from quotas.rollups import usage_rollup_due

    if day is not None:
        return rollup(day=dt.date.fromisoformat(day))
    return usage_rollup_due()


@shared_task(name="quotas.tasks.budget_alerts_check", time_limit=120, soft_time_limit=100)
def budget_alerts_check() -> int:
    """Create and deliver the budget alerts due now; returns how many were created."""
    from quotas.alerts import budget_alerts_check as check

    return len(check())


@shared_task(name="quotas.tasks.quota_sweep", time_limit=120, soft_time_limit=100)
def quota_sweep() -> int:
    """Refund the reservations and leases left by crashed workers; returns how many."""
    from quotas.services import reservations_sweep

    return int(reservations_sweep() or 0)


@shared_task(name="quotas.tasks.denials_persist", time_limit=120, soft_time_limit=100)
def denials_persist() -> int:
    """Copy the live refusal counts of yesterday and today into DenialCount (yesterday
    again so its last minutes are kept); returns how many counts were written."""
    from quotas.services import denials_persist as persist

    today = timezone.now().astimezone(dt.UTC).date()
    return persist(day=today - dt.timedelta(days=1)) + persist(day=today)
