from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from caching.http import ConditionalGetMixin
from caching.serializers import (
    CacheInvalidateInputSerializer,
    CacheInvalidateOutputSerializer,
    CacheStatsOutputSerializer,
)
from caching.services import cache_invalidate, cache_stats
from quotas.permissions import IsStaff
from quotas.views import RateLimitHeadersMixin


class CacheStatsView(ConditionalGetMixin, RateLimitHeadersMixin, APIView):
    permission_classes = [IsStaff]
    cache_max_age = 0  # live numbers: always revalidate, a 304 when nothing changed

    @extend_schema(responses=CacheStatsOutputSerializer)
    def get(self, request: Request) -> Response:
        return Response(CacheStatsOutputSerializer(cache_stats()).data)


class CacheInvalidateView(RateLimitHeadersMixin, APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        request=CacheInvalidateInputSerializer, responses=CacheInvalidateOutputSerializer
    )
    def post(self, request: Request) -> Response:
        serializer = CacheInvalidateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        removed = cache_invalidate(pattern=serializer.validated_data["pattern"])
        return Response(CacheInvalidateOutputSerializer({"invalidated": removed}).data)
