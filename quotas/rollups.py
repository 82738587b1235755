"""Daily roll-ups of the ledger and the record of budget alerts.

`DailyUsage` holds one row per UTC day, user and model, recomputed from the ledger by the
periodic `usage_rollup` task (the dashboard and `usage_report` read it instead of scanning
the ledger). `BudgetAlert` holds one row per user, budget period and threshold: its unique
constraint is what makes an alert fire once.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal

from django.conf import settings
from django.contrib import admin
from django.core.cache import cache
from django.db import connection, models, transaction
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

ZERO = Decimal(0)
logger = logging.getLogger("tollgate.rollups")


class DailyUsage(models.Model):
    """The ledger summed per UTC day, user and model. Rebuilt, never edited by hand."""

    day = models.DateField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    model = models.CharField(max_length=100)
    provider = models.CharField(max_length=20)
    requests = models.PositiveIntegerField(default=0, help_text="Ledger rows, hits included.")
    cached = models.PositiveIntegerField(default=0, help_text="Answered from cache.")
    fallbacks = models.PositiveIntegerField(default=0, help_text="Stale answers served.")
    errors = models.PositiveIntegerField(default=0, help_text="Upstream failures (refunded).")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=22, decimal_places=12, default=ZERO)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "quotas"
        verbose_name = verbose_name_plural = "daily usage"
        ordering = ("-day", "user_id", "model")
        constraints = [
            models.UniqueConstraint(
                fields=("day", "user", "model"),
                name="daily_usage_unique",
                nulls_distinct=False,
            ),
        ]
        indexes = [models.Index(fields=("user", "day"), name="daily_usage_user_day")]

    def __str__(self) -> str:
        return f"{self.day} {self.user_id} {self.model}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class BudgetPeriod(models.TextChoices):
    DAY = "day", "day"
    MONTH = "month", "month"


class BudgetAlert(models.Model):
    """A user passed `threshold` percent of a day or month cost budget (once per period)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="budget_alerts"
    )
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices)
    period_start = models.DateField(help_text="The UTC day, or the first day of the month.")
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the budget.")
    budget_usd = models.DecimalField(max_digits=14, decimal_places=6)
    spent_usd = models.DecimalField(max_digits=22, decimal_places=12)
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_to = models.JSONField(default=list, blank=True)
    email_sent = models.BooleanField(default=False)
    webhook_sent = models.BooleanField(default=False)
    delivery_attempts = models.PositiveSmallIntegerField(default=0)
    delivery_error = models.TextField(blank=True)

    class Meta:
        app_label = "quotas"
        verbose_name = "budget alert"
        ordering = ("-created_at",)
        constraints = [
            models.UniqueConstraint(
                fields=("user", "period", "period_start", "threshold"),
                name="budget_alert_once_per_period",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}: {self.threshold}% of {self.period} {self.period_start}"

    @property
    def delivered(self) -> bool:
        return not self.delivery_error and self.delivery_attempts > 0


def _day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def usage_rollup(*, day: dt.date) -> int:
    """Recompute the DailyUsage rows of one UTC day from the ledger; returns the row count.

    Idempotent: the day's rows are replaced in one transaction, so running it again (or two
    beat ticks overlapping) leaves exactly one row per user and model.
    """
    from quotas.models import Outcome, UsageRecord

    start, end = _day_bounds(day)
    errors = (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.UPSTREAM_UNAVAILABLE)
    groups = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .values("user_id", "model")
        .annotate(
            provider_name=Max("provider"),
            n=Count("id"),
            n_cached=Count("id", filter=Q(cached=True)),
            n_fallback=Count("id", filter=Q(fallback=True)),
            n_errors=Count("id", filter=Q(outcome__in=errors)),
            prompt=Coalesce(Sum("prompt_tokens"), 0),
            completion=Coalesce(Sum("completion_tokens"), 0),
            cost=Coalesce(Sum("cost_usd"), ZERO, output_field=models.DecimalField()),
        )
        .order_by()
    )
    rows = [
        DailyUsage(
            day=day,
            user_id=g["user_id"],
            model=g["model"],
            provider=g["provider_name"] or "",
            requests=g["n"],
            cached=g["n_cached"],
            fallbacks=g["n_fallback"],
            errors=g["n_errors"],
            prompt_tokens=g["prompt"],
            completion_tokens=g["completion"],
            cost_usd=g["cost"],
        )
        for g in groups
    ]
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                # Serialises concurrent roll-ups of the same day (released at commit): the
                # second waits for the first however long it takes (DATABASE_LOCK_TIMEOUT_MS
                # is for the request path).
                cursor.execute("SET LOCAL lock_timeout = 0")
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [7001, day.toordinal()])
        DailyUsage.objects.filter(day=day).delete()
        DailyUsage.objects.bulk_create(rows)
    return len(rows)


# The highest ledger ids the periodic roll-up saw at its last two runs (older, newer).
ROLLUP_MARKS_KEY = "quotas:rollup:ledger-marks"


def _marks_get() -> tuple[int, int] | None:
    try:
        marks = cache.get(ROLLUP_MARKS_KEY)
    except Exception:  # noqa: BLE001 - Redis away: roll up every day that may have changed
        logger.warning("roll-up marks unavailable; rolling up the whole window", exc_info=True)
        return None
    return (int(marks[0]), int(marks[1])) if marks else None


def _marks_set(marks: tuple[int, int]) -> None:
    try:
        cache.set(ROLLUP_MARKS_KEY, list(marks), timeout=None)
    except Exception:  # noqa: BLE001 - the next run rolls up the whole window instead
        logger.warning("roll-up marks not saved", exc_info=True)


def usage_rollup_due(*, now: dt.datetime | None = None) -> int:
    """The periodic roll-up: today, yesterday (rows written late, e.g. batched cache hits)
    and every earlier day that got ledger rows since the last runs; returns the row count.

    An earlier day gets rows when a spool is replayed after a long outage (a row is dated
    when its request was served) or when beat was down for days; the month's budget alerts
    and the dashboard add past days up from these rows, so such a day is rolled up again.
    It is found by its rows' ids: above the highest id the run before the last one saw, so
    a row committed after a higher id (its INSERT still running when that id was read) is
    still found a run later. Without marks (the first run, Redis flushed or unreachable, a
    database restored to fewer rows), every day of this month and of the dashboard's
    series is rolled up.
    """
    from health.selectors import SERIES_DAYS
    from quotas.models import UsageRecord

    today = (now or timezone.now()).astimezone(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    high = UsageRecord.objects.aggregate(high=Max("id"))["high"] or 0
    marks = _marks_get()
    if marks is None or marks[1] > high:
        first = min(today.replace(day=1), today - dt.timedelta(days=SERIES_DAYS - 1))
        days = {first + dt.timedelta(days=i) for i in range((yesterday - first).days)}
        marks = (high, high)
    else:
        days = set(
            UsageRecord.objects.filter(id__gt=marks[0], created_at__lt=_day_bounds(yesterday)[0])
            .annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
            .values_list("day", flat=True)
            .order_by()
            .distinct()
        )
    count = sum(usage_rollup(day=day) for day in sorted(days | {yesterday, today}))
    _marks_set((marks[1], high))
    return count


class DailyUsageAdmin(admin.ModelAdmin):
    list_display = (
        "day",
        "user",
        "model",
        "requests",
        "cached",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    )
    list_filter = ("day", "model", "provider")
    search_fields = ("user__username", "model")
    date_hierarchy = "day"
    list_select_related = ("user",)

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        # The month's budget alerts and the dashboard add up past days from these rows,
        # and the periodic roll-up recomputes a past day only when it gets new ledger
        # rows: a deleted row would be spend forgotten. `usage_rollup` rebuilds a day.
        return False


class BudgetAlertAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "period",
        "period_start",
        "threshold",
        "spent_usd",
        "budget_usd",
        "email_sent",
        "webhook_sent",
        "delivery_error",
    )
    list_filter = ("period", "threshold", "email_sent", "webhook_sent")
    search_fields = ("user__username",)
    list_select_related = ("user",)

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


# Registered here (not in quotas/admin.py) so the models and their admin travel together;
# guarded because the admin site is a process-wide singleton.
for _model, _model_admin in ((DailyUsage, DailyUsageAdmin), (BudgetAlert, BudgetAlertAdmin)):
    if not admin.site.is_registered(_model):
        admin.site.register(_model, _model_admin)
