"""Errors of the cache tier."""

from __future__ import annotations

from config.errors import ApiError


class WarmUserMissing(ApiError):
    status_code = 400
    code = "warm_user_missing"
    message = "No account to charge cache warming to."
