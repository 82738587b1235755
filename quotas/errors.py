"""Error codes of the quotas app (API.md)."""

from __future__ import annotations

import math
from typing import Any

from config.errors import ApiError, AuthenticationError, PermissionDeniedError


class QuotaExceeded(ApiError):
    """429: a window of some scope is full. Carries the scope, dimension, limit and wait."""

    status_code = 429
    code = "quota_exceeded"

    def __init__(
        self,
        *,
        scope: str,
        dimension: str,
        limit: int | str,
        retry_after: float,
        message: str | None = None,
    ) -> None:
        wait = max(1, math.ceil(retry_after))
        super().__init__(
            message or f"Quota exceeded: {dimension} of the {scope} scope (limit {limit}).",
            scope=scope,
            dimension=dimension,
            limit=limit,
            retry_after=wait,
        )
        self.scope = scope
        self.dimension = dimension
        self.limit = limit
        self.retry_after = wait
        # Rate-limit headers of the refused request, and the policy that refused it (so
        # that the caller may serve a stale answer if the plan allows).
        self.headers: dict[str, str] = {}
        self.policy: Any = None
        # An admission's CacheGate: whether it looked the entry up, and the entry it found.
        self.looked_up = False
        self.entry: bytes | None = None

    def extra_headers(self) -> dict[str, str]:
        return {**self.headers, "Retry-After": str(self.retry_after)}


class DuplicateRequest(ApiError):
    """409: a request with this id holds a reservation already (a retry still in flight)."""

    status_code = 409
    code = "duplicate_request"
    message = "A request with this id is already in flight."


class QuotaUnavailable(ApiError):
    """503: Redis is unreachable and QUOTA_FAIL_MODE=closed, or fail-open's ledger is too."""

    status_code = 503
    code = "quota_unavailable"
    message = "Quota enforcement is unavailable; try again shortly."

    def extra_headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class KeyRevoked(AuthenticationError):
    code = "key_revoked"
    message = "This API key has been revoked."


class KeyExpired(AuthenticationError):
    code = "key_expired"
    message = "This API key has expired."


class UserInactive(AuthenticationError):
    code = "user_inactive"
    message = "This user is inactive."


class UserSuspended(PermissionDeniedError):
    message = "This user's access is suspended."


class ModelNotAllowed(PermissionDeniedError):
    message = "This model is not allowed for your plan or key."


class ScopeNotAllowed(PermissionDeniedError):
    message = "This API key does not have the scope this endpoint needs."


class TooManyAuthFailures(ApiError):
    status_code = 429
    code = "too_many_authentication_failures"
    message = "Too many failed authentications from this address; try again later."

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after=retry_after)
        self.retry_after = retry_after

    def extra_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
