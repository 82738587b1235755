"""Budget alerts: a user who passes 80% or 100% of a day or month cost budget is told once.

The budget is the user's own `cost_per_day` / `cost_per_month` (their UserQuota override,
else their plan's, else the default plan's); key limits are per key and not budgets of the
user. Spending comes from the ledger: today's rows directly, the month's earlier days from
the DailyUsage roll-up. "Once per threshold per period" is the unique constraint of
`BudgetAlert`: of any number of concurrent checks, exactly one creates the row, and only
the one that created it delivers it (email through Django's mail, and/or a JSON webhook).
A failed delivery is kept on the row and tried again by the next checks, a few times; so is
an alert whose check died between creating and delivering it (a crash, a time limit).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from quotas.models import Plan, UsageRecord, UserQuota
from quotas.policy import usd_text
from quotas.rollups import BudgetAlert, BudgetPeriod, DailyUsage

logger = logging.getLogger("tollgate.alerts")

MAX_DELIVERY_ATTEMPTS = 3
# An alert never tried this long after its creation was left by a check that died before
# delivering it: longer than the check task's hard time limit (120 s), so the check that
# created it is done or dead and a later one never sends it twice.
UNDELIVERED_GRACE = dt.timedelta(seconds=180)
# A threshold passed between a period's last check and its end is alerted by the checks of
# this long into the next period (a minute apart, some of them late or failed), which read
# the period that ended; its earlier days come from the roll-up, final by then. Not longer:
# the budget compared is today's, and one lowered since would raise alerts that never were.
PERIOD_END_GRACE = dt.timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class Budgets:
    day: Decimal | None
    month: Decimal | None


def budgets_of_users(*, user_ids: list[int]) -> dict[int, Budgets]:
    """Effective day and month cost budgets (USD) per user; None = unlimited."""
    default_plan = Plan.objects.filter(name=settings.QUOTA_DEFAULT_PLAN).first()
    quotas = {
        q.user_id: q for q in UserQuota.objects.select_related("plan").filter(user_id__in=user_ids)
    }
    result: dict[int, Budgets] = {}
    for user_id in user_ids:
        quota = quotas.get(user_id)
        plan = quota.plan if quota is not None and quota.plan is not None else default_plan
        values: list[Decimal | None] = []
        for dim in ("cost_per_day", "cost_per_month"):
            override = getattr(quota, dim) if quota is not None else None
            values.append(override if override is not None else getattr(plan, dim, None))
        result[user_id] = Budgets(day=values[0], month=values[1])
    return result


def _spend_today(start: dt.datetime, end: dt.datetime) -> dict[int, Decimal]:
    rows = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end, user__isnull=False)
        .values("user_id")
        .annotate(total=Sum("cost_usd"))
        .order_by()
    )
    return {r["user_id"]: r["total"] or Decimal(0) for r in rows}


def _spend_earlier_this_month(month_start: dt.date, today: dt.date) -> dict[int, Decimal]:
    rows = (
        DailyUsage.objects.filter(day__gte=month_start, day__lt=today, user__isnull=False)
        .values("user_id")
        .annotate(total=Sum("cost_usd"))
        .order_by()
    )
    return {r["user_id"]: r["total"] or Decimal(0) for r in rows}


def _spend_through(day: dt.date) -> tuple[dict[int, Decimal], dict[int, Decimal]]:
    """(spend on `day`, spend in its month up to and including it) per user."""
    day_start = dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)
    spend_day = _spend_today(day_start, day_start + dt.timedelta(days=1))
    earlier = _spend_earlier_this_month(day.replace(day=1), day)
    spend_month = {
        uid: spend_day.get(uid, Decimal(0)) + earlier.get(uid, Decimal(0))
        for uid in set(spend_day) | set(earlier)
    }
    return spend_day, spend_month


def budget_alerts_check(*, now: dt.datetime | None = None) -> list[BudgetAlert]:
    """Create and deliver the alerts due now; returns the alerts created by this call.

    Thresholds are BUDGET_ALERT_THRESHOLDS (percent). A budget of 0 refuses everything and
    never alerts; an unlimited budget never alerts. For PERIOD_END_GRACE after midnight
    the day (and month) just ended are checked too, against the ledger: a threshold
    passed after the last check of a period is still alerted, once.
    """
    now = now or timezone.now()
    today = now.astimezone(dt.UTC).date()
    spend_day, spend_month = _spend_through(today)
    due = [
        (BudgetPeriod.DAY, today, spend_day),
        (BudgetPeriod.MONTH, today.replace(day=1), spend_month),
    ]
    if now - dt.datetime.combine(today, dt.time.min, tzinfo=dt.UTC) < PERIOD_END_GRACE:
        yesterday = today - dt.timedelta(days=1)
        ended_day, ended_month = _spend_through(yesterday)
        due.append((BudgetPeriod.DAY, yesterday, ended_day))
        if yesterday.month != today.month:
            due.append((BudgetPeriod.MONTH, yesterday.replace(day=1), ended_month))
    budgets = budgets_of_users(user_ids=sorted(set().union(*(spend for _, _, spend in due))))
    thresholds = sorted({int(t) for t in settings.BUDGET_ALERT_THRESHOLDS})

    created: list[BudgetAlert] = []
    for user_id, budget in budgets.items():
        for period, start, spend in due:
            limit = budget.day if period == BudgetPeriod.DAY else budget.month
            spent = spend.get(user_id, Decimal(0))
            if limit is None or limit <= 0:
                continue
            for threshold in thresholds:
                if spent * 100 < limit * threshold:
                    break
                alert = _alert_create_once(
                    user_id=user_id,
                    period=period,
                    period_start=start,
                    threshold=threshold,
                    budget=limit,
                    spent=spent,
                )
                if alert is not None:
                    created.append(alert)
    for alert in created:
        alert_deliver(alert=alert)
    _retry_failed_deliveries(exclude={a.pk for a in created})
    return created


def _alert_create_once(
    *,
    user_id: int,
    period: str,
    period_start: dt.date,
    threshold: int,
    budget: Decimal,
    spent: Decimal,
) -> BudgetAlert | None:
    """The new alert, or None if this threshold of this period was already alerted."""
    if BudgetAlert.objects.filter(
        user_id=user_id, period=period, period_start=period_start, threshold=threshold
    ).exists():
        return None
    try:
        with transaction.atomic():
            return BudgetAlert.objects.create(
                user_id=user_id,
                period=period,
                period_start=period_start,
                threshold=threshold,
                budget_usd=budget,
                spent_usd=spent,
            )
    except IntegrityError:
        # Another check created it first: it delivers, this one does not.
        return None


def _retry_failed_deliveries(*, exclude: set[int]) -> None:
    # created_at is the wall clock's (auto_now_add), whatever `now` a check is given.
    abandoned = Q(delivery_attempts=0, created_at__lt=timezone.now() - UNDELIVERED_GRACE)
    pending = (
        BudgetAlert.objects.filter(~Q(delivery_error="") | abandoned)
        .filter(delivery_attempts__lt=MAX_DELIVERY_ATTEMPTS)
        .exclude(pk__in=exclude)
        .order_by("created_at")
    )
    for alert in pending[:100]:
        alert_deliver(alert=alert)


def alert_payload(*, alert: BudgetAlert) -> dict[str, Any]:
    """The webhook body (and the facts of the email)."""
    user = alert.user
    return {
        "event": "budget_threshold_passed",
        "user": user.get_username(),
        "period": alert.period,
        "period_start": alert.period_start.isoformat(),
        "threshold_percent": alert.threshold,
        "budget_usd": usd_text(alert.budget_usd),
        "spent_usd": usd_text(alert.spent_usd),
        "created_at": alert.created_at.isoformat(),
    }


def alert_deliver(*, alert: BudgetAlert) -> None:
    """Send one alert by email and/or webhook, as configured, and record the outcome.

    Two checks may hold the same alert (one outliving the beat period while a webhook is
    slow meets the next): the alert's row stays locked from before anything is sent until
    the outcome is saved, and a check that finds it locked, or delivered again since it
    read it (its attempts counted up), leaves it alone, so nothing is sent twice.
    """
    with transaction.atomic():
        mine = BudgetAlert.objects.select_for_update(skip_locked=True).filter(
            pk=alert.pk, delivery_attempts=alert.delivery_attempts
        )
        if not list(mine.values_list("pk", flat=True)):
            return
        _alert_send(alert=alert)


def _alert_send(*, alert: BudgetAlert) -> None:
    payload = alert_payload(alert=alert)
    errors: list[str] = []
    recipients = list(settings.BUDGET_ALERT_EMAILS)
    user_email = getattr(alert.user, "email", "")
    if settings.BUDGET_ALERT_EMAIL_USER and user_email:
        recipients.insert(0, user_email)
    if recipients and not alert.email_sent:
        subject = (
            f"Tollgate: {payload['user']} passed {alert.threshold}% of the {alert.period} budget"
        )
        body = (
            f"{payload['user']} has spent ${payload['spent_usd']} of a {alert.period} budget of "
            f"${payload['budget_usd']} ({alert.threshold}% threshold) in the {alert.period} "
            f"starting {payload['period_start']} (UTC).\n"
        )
        try:
            send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
            alert.email_sent = True
            alert.emailed_to = recipients
        except Exception as exc:  # noqa: BLE001 - any mail failure is recorded and retried
            errors.append(f"email: {exc}")
    if settings.BUDGET_ALERT_WEBHOOK_URL and not alert.webhook_sent:
        try:
            response = httpx.post(
                settings.BUDGET_ALERT_WEBHOOK_URL,
                json=payload,
                timeout=settings.BUDGET_ALERT_WEBHOOK_TIMEOUT,
            )
            response.raise_for_status()
            alert.webhook_sent = True
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # InvalidURL (a malformed BUDGET_ALERT_WEBHOOK_URL) is not an HTTPError.
            errors.append(f"webhook: {exc}")
    alert.delivery_attempts += 1
    alert.delivery_error = "; ".join(errors)[:2000]
    alert.save(
        update_fields=[
            "email_sent",
            "emailed_to",
            "webhook_sent",
            "delivery_attempts",
            "delivery_error",
        ]
    )
    if errors:
        logger.warning("budget alert %s not fully delivered: %s", alert.pk, alert.delivery_error)
    else:
        logger.info(
            "budget alert sent",
            extra={"alert_id": alert.pk, "period": alert.period, "threshold": alert.threshold},
        )
