"""Errors of the cache tier."""

from __future__ import annotations

from config.errors import ApiError


class CacheUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"
    message = "The shared cache (Redis) cannot take answers."


class WarmUserMissing(ApiError):
    status_code = 400
    code = "warm_user_missing"
    message = "No account to charge cache warming to."
