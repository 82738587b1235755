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
