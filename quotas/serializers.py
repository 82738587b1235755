from __future__ import annotations

from typing import Any

from rest_framework import serializers


class UsageQueryInputSerializer(serializers.Serializer):
    start = serializers.DateField(required=False)
    end = serializers.DateField(required=False)
    group_by = serializers.ChoiceField(choices=("day", "model", "key"), required=False)
    user = serializers.CharField(required=False, max_length=150)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, end = attrs.get("start"), attrs.get("end")
        if start and end and start > end:
            raise serializers.ValidationError({"start": ["start must not be after end."]})
        if start and end and (end - start).days > 366:
            raise serializers.ValidationError({"end": ["At most 366 days at a time."]})
        return attrs


class LimitStandingSerializer(serializers.Serializer):
    limit = serializers.JSONField(help_text="null: unlimited; USD as a decimal string for cost")
    used = serializers.JSONField()
    remaining = serializers.JSONField(help_text="null: unlimited")
    reset_in = serializers.IntegerField(required=False, help_text="seconds")


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
    global_ = serializers.DictField(source="global")
    providers = serializers.DictField()
    denials_today = serializers.ListField(child=serializers.DictField())
    priority_shares = serializers.DictField()
    circuits = serializers.ListField(child=serializers.DictField())
    backend = serializers.DictField()
