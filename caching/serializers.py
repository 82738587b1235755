from __future__ import annotations

from rest_framework import serializers


class CacheInvalidateInputSerializer(serializers.Serializer):
    pattern = serializers.CharField(max_length=512, trim_whitespace=True)


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
