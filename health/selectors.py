"""What the operator's dashboard shows, read from the ledger, its daily roll-up and the live
counters. Every query is an aggregate over an indexed range of `created_at` (or of the
roll-up's `day`); nothing walks the ledger row by row in Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count, DecimalField, Q, Sum
from django.db.models.functions import Coalesce, TruncDate

from quotas.models import DenialCount, Plan, UsageRecord, UserQuota

logger = logging.getLogger(__name__)
ZERO = Decimal(0)
SERIES_DAYS = 30


@dataclass(frozen=True, slots=True)
class DayTotals:
    day: dt.date
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = ZERO

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def hit_rate(self) -> float | None:
        """Share of requests answered from cache (None when there were none)."""
        return self.cached / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class UserSpend:
    user_id: int | None
    username: str
    plan: str | None
    requests: int
    cost_today: Decimal
    cost_month: Decimal
    budget_day: Decimal | None
    budget_month: Decimal | None

    @property
    def day_use(self) -> float | None:
        """Fraction of the day budget spent (None: unlimited)."""
        return _fraction(self.cost_today, self.budget_day)

    @property
    def month_use(self) -> float | None:
        return _fraction(self.cost_month, self.budget_month)


@dataclass(slots=True)
class Overview:
    today: DayTotals
    series: list[DayTotals]
    top_users: list[UserSpend]
    denials: list[tuple[str, str, int]]
    circuits: list[dict[str, Any]] | None
    shared: list[dict[str, Any]] | None
    generated_at: dt.datetime
    notes: list[str] = field(default_factory=list)


def _fraction(spent: Decimal, budget: Decimal | None) -> float | None:
    if budget is None:
        return None
    if budget <= 0:
        return 1.0
    return float(spent / budget)


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


def _sums() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "cached": Count("id", filter=Q(cached=True)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "cost_usd": Coalesce(Sum("cost_usd"), ZERO, output_field=DecimalField()),
    }


def ledger_day_totals(*, start: dt.date, end: dt.date) -> dict[dt.date, DayTotals]:
    """Ledger totals of UTC days start..end inclusive, one grouped query."""
    rows = (
        UsageRecord.objects.filter(
            created_at__gte=_day_start(start), created_at__lt=_day_start(end + dt.timedelta(days=1))
        )
        .annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
        .values("day")
        .annotate(**_sums())
        .order_by()
    )
    return {row["day"]: _totals(row["day"], row) for row in rows}


def _totals(day: dt.date, row: Mapping[str, Any]) -> DayTotals:
    return DayTotals(
        day=day,
        requests=row["requests"] or 0,
        cached=row["cached"] or 0,
        prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0,
        cost_usd=row["cost_usd"] or ZERO,
    )


def _rollup_day_totals(*, start: dt.date, end: dt.date) -> dict[dt.date, DayTotals]:
    """Totals of the days the daily roll-up has already computed (none if it is absent)."""
    try:
        from quotas.rollups import DailyUsage
    except ImportError:
        return {}
    rows = (
        DailyUsage.objects.filter(day__gte=start, day__lte=end)
        .values("day")
        .annotate(
            requests=Coalesce(Sum("requests"), 0),
            cached=Coalesce(Sum("cached"), 0),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
            completion_tokens=Coalesce(Sum("completion_tokens"), 0),
            cost_usd=Coalesce(Sum("cost_usd"), ZERO, output_field=DecimalField()),
        )
        .order_by()
    )
    return {row["day"]: _totals(row["day"], row) for row in rows}


def daily_series(*, today: dt.date, days: int = SERIES_DAYS) -> list[DayTotals]:
    """The last `days` UTC days, oldest first, today included.

    Past days come from the daily roll-up where it has run; today, and any past day the
    roll-up has not covered, are summed from the ledger in one range query.
    """
    start = today - dt.timedelta(days=days - 1)
    rolled = _rollup_day_totals(start=start, end=today - dt.timedelta(days=1))
    missing = [start + dt.timedelta(days=i) for i in range(days)]
    missing = [day for day in missing if day not in rolled]
    live = ledger_day_totals(start=missing[0], end=missing[-1]) if missing else {}
    series = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        series.append(rolled.get(day) or live.get(day) or DayTotals(day=day))
    return series


def _effective_budgets(
    user_ids: list[int],
) -> dict[int, tuple[str | None, Decimal | None, Decimal | None]]:
    """(plan name, cost_per_day, cost_per_month) of each user: override, else plan, else
    the default plan (QUOTA_DEFAULT_PLAN)."""
    quotas = {
        q.user_id: q for q in UserQuota.objects.filter(user_id__in=user_ids).select_related("plan")
    }
    default_plan = Plan.objects.filter(name=settings.QUOTA_DEFAULT_PLAN).first()
    budgets = {}
    for user_id in user_ids:
        quota = quotas.get(user_id)
        plan = quota.plan if quota is not None and quota.plan_id else default_plan
        day = quota.cost_per_day if quota is not None and quota.cost_per_day is not None else None
        month = (
            quota.cost_per_month if quota is not None and quota.cost_per_month is not None else None
        )
        if day is None and plan is not None:
            day = plan.cost_per_day
        if month is None and plan is not None:
            month = plan.cost_per_month
        budgets[user_id] = (plan.name if plan is not None else None, day, month)
    return budgets


def top_users_by_cost(*, today: dt.date, limit: int = 10) -> list[UserSpend]:
    """The users who spent most today, with their month to date and their cost budgets."""
    rows = list(
        UsageRecord.objects.filter(created_at__gte=_day_start(today), user_id__isnull=False)
        .values("user_id")
        .annotate(
            requests=Count("id"), cost=Coalesce(Sum("cost_usd"), ZERO, output_field=DecimalField())
        )
        .order_by("-cost", "-requests")[:limit]
    )
    if not rows:
        return []
    user_ids = [row["user_id"] for row in rows]
    month_start = _day_start(today.replace(day=1))
    month = dict(
        UsageRecord.objects.filter(user_id__in=user_ids, created_at__gte=month_start)
        .values("user_id")
        .annotate(cost=Coalesce(Sum("cost_usd"), ZERO, output_field=DecimalField()))
        .values_list("user_id", "cost")
        .order_by()
    )
    names = dict(get_user_model().objects.filter(pk__in=user_ids).values_list("pk", "username"))
    budgets = _effective_budgets(user_ids)
    return [
        UserSpend(
            user_id=row["user_id"],
            username=names.get(row["user_id"], f"#{row['user_id']}"),
            plan=budgets[row["user_id"]][0],
            requests=row["requests"],
            cost_today=row["cost"],
            cost_month=month.get(row["user_id"], row["cost"]),
            budget_day=budgets[row["user_id"]][1],
            budget_month=budgets[row["user_id"]][2],
        )
        for row in rows
    ]


def _live_denials(today: dt.date) -> dict[tuple[str, str], int]:
    """Today's refusals from the quota engine's live counters ({} when unreachable)."""
    from quotas import services

    try:
        raw = services.backend().denials(day=today.strftime("%Y%m%d"))
    except Exception:  # a dashboard must render with Redis down
        logger.warning("live denial counts unavailable", exc_info=True)
        return {}
    counts: dict[tuple[str, str], int] = {}
    for name, count in raw.items():
        scope, _, dimension = str(name).partition("|")
        counts[(scope, dimension)] = int(count)
    return counts


def denials_by_reason(*, today: dt.date) -> list[tuple[str, str, int]]:
    """(scope, dimension, count) refused today, most frequent first.

    The persisted DenialCount rows and the live counters describe the same refusals (the
    rows are copies taken periodically), so the larger of the two is the current count.
    """
    counts = {
        (row.scope, row.dimension): row.count for row in DenialCount.objects.filter(day=today)
    }
    for reason, count in _live_denials(today).items():
        counts[reason] = max(count, counts.get(reason, 0))
    return sorted(
        ((s, d, n) for (s, d), n in counts.items() if n), key=lambda r: (-r[2], r[0], r[1])
    )


def open_circuits() -> list[dict[str, Any]] | None:
    """Circuit breakers that are not closed (None: the generation app does not report them)."""
    try:
        from generation import services
    except ImportError:
        return None
    reader = getattr(services, "circuit_states", None)
    if reader is None:
        return None
    try:
        states = reader()
    except Exception:
        logger.warning("circuit states unavailable", exc_info=True)
        return None
    rows = []
    for item in _as_rows(states):
        if str(item.get("state", "")).lower() not in ("closed", "0", ""):
            rows.append(item)
    return rows


def _as_rows(states: Any) -> list[dict[str, Any]]:
    """Accept a mapping {name: state | {..}} or a list of mappings/objects."""
    if isinstance(states, dict):
        rows = []
        for name, value in states.items():
            if isinstance(value, dict):
                rows.append({"name": str(name), **value})
            else:
                rows.append({"name": str(name), "state": getattr(value, "value", value)})
        return rows
    rows = []
    for value in states or ():
        if isinstance(value, dict):
            rows.append(dict(value))
        else:
            rows.append(
                {
                    k: getattr(value, k)
                    for k in dir(value)
                    if not k.startswith("_") and not callable(getattr(value, k))
                }
            )
    for row in rows:
        state = row.get("state")
        row["state"] = getattr(state, "value", state)
        row.setdefault("name", f"{row.get('provider', '')}:{row.get('model', '')}".strip(":"))
    return rows


def shared_headroom() -> list[dict[str, Any]] | None:
    """Live use of the global and provider scopes, one row per window (None: unreachable)."""
    from quotas.services import quota_global

    try:
        standing = quota_global()
    except Exception:
        logger.warning("shared quota standing unavailable", exc_info=True)
        return None
    if not standing.get("backend", {}).get("live", True):
        return None
    rows = [
        {"scope": "global", "dimension": dim, **entry}
        for dim, entry in standing.get("global", {}).items()
    ]
    for provider, windows in sorted(standing.get("providers", {}).items()):
        rows += [{"scope": provider, "dimension": dim, **entry} for dim, entry in windows.items()]
    return rows


def dashboard_overview(*, now: dt.datetime) -> Overview:
    """Everything the dashboard page shows, as of `now` (UTC)."""
    today = now.astimezone(dt.UTC).date()
    series = daily_series(today=today)
    circuits = open_circuits()
    shared = shared_headroom()
    notes = []
    if circuits is None:
        notes.append("Circuit breaker states are unavailable.")
    if shared is None:
        notes.append("Live quota counters are unavailable (Redis unreachable?).")
    return Overview(
        today=series[-1],
        series=series,
        top_users=top_users_by_cost(today=today),
        denials=denials_by_reason(today=today),
        circuits=circuits,
        shared=shared,
        generated_at=now,
        notes=notes,
    )
