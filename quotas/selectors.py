"""Read-side queries over the governance data and the usage ledger."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate

from config.errors import InvalidRequest
from quotas.models import ApiKey, Plan, ProviderQuota, UsageRecord
from quotas.policy import usd_text

# group_by -> the expression a ledger row is grouped by. "user" is for operators' reports;
# the API offers day, model and key.
USAGE_GROUPS = ("day", "model", "key", "user")


def money(value: Decimal | None) -> str:
    """A USD amount as the contract's decimal string ("0.000150"; `usd_text`)."""
    return usd_text(value or Decimal(0))


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


def user_id_by_username(username: str) -> int | None:
    """The id of the user with this username, or None."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(username=username).values_list("pk", flat=True).first()


def usage_queryset(*, user_id: int | None, start: dt.date, end: dt.date) -> QuerySet[UsageRecord]:
    """Ledger rows of one user (None: every user) created on UTC days start..end inclusive."""
    rows = UsageRecord.objects.filter(created_at__gte=_day_start(start))
    if end < dt.date.max:  # the last day there is has no day after it
        rows = rows.filter(created_at__lt=_day_start(end + dt.timedelta(days=1)))
    if user_id is not None:
        rows = rows.filter(user_id=user_id)
    return rows


def _aggregates() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "cached": Count("id", filter=Q(cached=True)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "cost_usd": Sum("cost_usd"),
    }


def _group_expression(group_by: str) -> Any:
    if group_by == "day":
        return TruncDate("created_at", tzinfo=dt.UTC)
    if group_by == "model":
        return F("model")
    if group_by == "key":
        return F("api_key__prefix")
    return F("user__username")


def _group_label(group_by: str, group: Any) -> str | None:
    if group is None:
        return None
    if group_by == "day":
        return str(group.isoformat())
    if group_by == "key":
        return f"tg_{group}"
    return str(group)


def _row(values: Mapping[str, Any], group: str | None) -> dict[str, Any]:
    return {
        "group": group,
        "requests": values["requests"],
        "cached": values["cached"],
        "prompt_tokens": values["prompt_tokens"],
        "completion_tokens": values["completion_tokens"],
        "cost_usd": money(values["cost_usd"]),
    }


def usage_rows(
    *, user_id: int | None, start: dt.date, end: dt.date, group_by: str
) -> dict[str, Any]:
    """Usage from the ledger, as the body of GET /api/v1/usage.

    `start` and `end` are UTC calendar days, both included; `user_id` None covers every
    user. `group_by` is day, model, key (the key's "tg_<prefix>", null for requests made
    without a key) or user (the username, null for rows whose user was deleted). Each row
    and the totals carry `requests` (every ledger row: admitted requests and cache hits),
    `cached` (cache hits among them), token sums, and `cost_usd` as a decimal string to the
    micro-dollar. Rows are ordered by group. Two aggregate queries, whatever the range.

    Raises InvalidRequest for an unknown `group_by` or a range that ends before it starts.
    """
    if group_by not in USAGE_GROUPS:
        raise InvalidRequest(
            "Unknown grouping.",
            fields={"group_by": [f"Must be one of: {', '.join(USAGE_GROUPS)}."]},
        )
    if end < start:
        raise InvalidRequest(
            "The range ends before it starts.", fields={"end": ["Must not be before start."]}
        )
    rows = usage_queryset(user_id=user_id, start=start, end=end)
    grouped = (
        rows.annotate(group=_group_expression(group_by))
        .values("group")
        .annotate(**_aggregates())
        .order_by(F("group").asc(nulls_last=True))
    )
    return {
        "rows": [_row(values, _group_label(group_by, values["group"])) for values in grouped],
        "totals": {
            key: value
            for key, value in _row(rows.aggregate(**_aggregates()), None).items()
            if key != "group"
        },
    }


# The keys a reference list names one by one; past that it says how many more there are.
REFERENCES_KEYS_SHOWN = 10


def model_references(*, model: str, provider: str, provider_only: bool = False) -> list[str]:
    """What names the catalogue model `model` of `provider`, for an operator to read: the
    provider quota on it, the plans that allow it, the keys whose scopes name it (revoked
    ones aside: no one uses them again) and the deployment's default model. They all name
    it by name, so renamed or deleted it would slip out of that provider limit, unnoticed,
    and be refused to those plans, keys and requests.

    `provider_only`: only what a move to another provider breaks, its provider quota (the
    other references name the model, whatever its provider).
    """
    found = [
        f"the provider quota {row}"
        for row in ProviderQuota.objects.filter(provider=provider, model=model)
    ]
    if provider_only:
        return found
    found += [
        f"plan “{plan.name}” (allowed models)"
        for plan in Plan.objects.exclude(allowed_models=[]).order_by("name")
        if model in plan.allowed_models
    ]
    # JSON containment is a PostgreSQL lookup; the keys with scopes are read and looked
    # through instead, which an operator's rename or delete can afford.
    scope = f"model:{model}"
    keys = [
        key
        for key in ApiKey.objects.filter(revoked_at__isnull=True)
        .exclude(scopes=[])
        .select_related("user")
        .order_by("prefix")
        if scope in key.scopes
    ]
    found += [f"API key {key} (scope {scope})" for key in keys[:REFERENCES_KEYS_SHOWN]]
    if len(keys) > REFERENCES_KEYS_SHOWN:
        found.append(f"{len(keys) - REFERENCES_KEYS_SHOWN} other API key(s) (scope {scope})")
    if model == settings.TOLLGATE_DEFAULT_MODEL:
        found.append("the default model of requests that name none (TOLLGATE_DEFAULT_MODEL)")
    return found
