from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django.utils import timezone
from rest_framework import serializers


class IsoDateField(serializers.DateField):
    """A date written YYYY-MM-DD, and no other way."""

    def to_internal_value(self, value: Any) -> dt.date:
        if not isinstance(value, str) or not _ISO_DATE.fullmatch(value):
            self.fail("invalid", format="YYYY-MM-DD")
        return super().to_internal_value(value)  # type: ignore[no-any-return]


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
USAGE_MAX_DAYS = 366
USAGE_DEFAULT_DAYS = 30


class UsageQueryInputSerializer(serializers.Serializer):
    start = IsoDateField(required=False, help_text=f"default: {USAGE_DEFAULT_DAYS} days before end")
    end = IsoDateField(required=False, help_text="default: today (UTC)")
    group_by = serializers.ChoiceField(choices=("day", "model", "key"), required=False)
    user = serializers.CharField(required=False, max_length=150)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fills in the defaults; the range, given or not, is at most USAGE_MAX_DAYS."""
        end = attrs.get("end") or timezone.now().date()
        # Counted from the first day there is up, so that an `end` in its first month does
        # not overflow the date type (a 500).
        earliest = dt.date.min + dt.timedelta(days=USAGE_DEFAULT_DAYS)
        start = attrs.get("start") or (
            end - dt.timedelta(days=USAGE_DEFAULT_DAYS) if end >= earliest else dt.date.min
        )
        if start > end:
            raise serializers.ValidationError({"start": ["start must not be after end."]})
        if (end - start).days > USAGE_MAX_DAYS:
            field = "end" if "end" in attrs else "start"
            raise serializers.ValidationError(
                {field: [f"At most {USAGE_MAX_DAYS} days at a time."]}
            )
        return {**attrs, "start": start, "end": end, "group_by": attrs.get("group_by") or "day"}


class LimitStandingSerializer(serializers.Serializer):
    limit = serializers.JSONField(help_text="null: unlimited; USD as a decimal string for cost")
    used = serializers.JSONField()
    remaining = serializers.JSONField(help_text="null: unlimited")
    reset_in = serializers.IntegerField(
        required=False,
        help_text="Whole seconds until the window's use frees up (0 for an unlimited "
        "dimension). Absent for concurrency: requests in flight have no window.",
    )


class QuotaStandingOutputSerializer(serializers.Serializer):
    user = serializers.CharField()
    key = serializers.CharField(allow_null=True)
    plan = serializers.CharField(allow_null=True)
    suspended = serializers.BooleanField(help_text="The user's access is suspended (403).")
    limits = serializers.DictField(child=LimitStandingSerializer())


class UsageRowSerializer(serializers.Serializer):
    group = serializers.CharField(allow_null=True)
    requests = serializers.IntegerField()
    cached = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField()


class UsageReportOutputSerializer(serializers.Serializer):
    rows = UsageRowSerializer(many=True)
    totals = serializers.DictField()


class QuotaGlobalOutputSerializer(serializers.Serializer):
    # The body is described in API.md; its scopes are keyed by dimension and provider.
    # `global` is a keyword, so that field is added by name in get_fields.
    providers = serializers.DictField(
        child=serializers.DictField(child=LimitStandingSerializer()),
        help_text="provider:model (model * for all its models) -> dimension -> standing",
    )
    denials_today = serializers.ListField(child=serializers.DictField())
    priority_shares = serializers.DictField()
    circuits = serializers.ListField(child=serializers.DictField())
    backend = serializers.DictField()

    def get_fields(self) -> dict[str, serializers.Field]:
        limits = serializers.DictField(
            child=LimitStandingSerializer(), help_text="dimension -> standing"
        )
        return {"global": limits, **super().get_fields()}
