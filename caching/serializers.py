from __future__ import annotations

from typing import Any

from rest_framework import serializers

from caching.patterns import PatternError, pattern_compile


class _StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class CacheInvalidateInputSerializer(serializers.Serializer):
    pattern = _StrictCharField(
        max_length=512,
        help_text="A glob over cache keys, case ignored: * any run of characters, ? one, "
        "[abc] [a-z] one of a set, [^abc] or [!abc] one outside it, \\x the character x "
        "itself; e.g. topic:python*, topic:*:subtopics:*, gen:*. One that does not parse "
        "(topic:[ ) is a 400.",
    )

    def validate_pattern(self, value: str) -> str:
        try:
            pattern_compile(value)
        except PatternError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return value


class CacheInvalidateOutputSerializer(serializers.Serializer):
    invalidated = serializers.IntegerField()


class _MemoryStatsSerializer(serializers.Serializer):
    size = serializers.IntegerField()
    max_size = serializers.IntegerField()
    hits = serializers.IntegerField()
    misses = serializers.IntegerField()


class _RedisStatsSerializer(serializers.Serializer):
    hits = serializers.IntegerField()
    misses = serializers.IntegerField()
    hit_rate = serializers.FloatField()


class _StaleStatsSerializer(serializers.Serializer):
    hits = serializers.IntegerField()
    misses = serializers.IntegerField()


class CacheStatsOutputSerializer(serializers.Serializer):
    memory = _MemoryStatsSerializer()
    redis = _RedisStatsSerializer()
    stale = _StaleStatsSerializer()
    sets = serializers.IntegerField()
    popular = serializers.ListField(child=serializers.ListField())
