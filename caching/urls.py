from django.urls import path

from caching.views import CacheInvalidateView, CacheStatsView

urlpatterns = [
    path("cache/stats", CacheStatsView.as_view(), name="cache-stats"),
    path("cache/invalidate", CacheInvalidateView.as_view(), name="cache-invalidate"),
]
