"""Celery tasks of the cache tier (their schedule lives with the Celery beat settings)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from caching.warming import popular_refresh, warm_user_get


@shared_task(name="caching.popular_refresh", time_limit=1800, soft_time_limit=1700)
def cache_popular_refresh(*, limit: int = 100) -> dict[str, Any]:
    """Recompute the answers of popular topics before they expire (see popular_refresh);
    returns the counts for the task result."""
    report = popular_refresh(user_id=warm_user_get(), limit=limit)
    return {
        "warmed": len(report.warmed),
        "cached": len(report.cached),
        "failed": report.failed,
    }
