"""Error codes of the generation app (API.md): upstream failures are 502/503/504 and are
never charged."""

from __future__ import annotations

import math
from typing import Any

from config.errors import ApiError


class GenerationError(ApiError):
    """Base of the generation errors; carries the response's rate-limit headers and the
    ledger outcome of the refund it causes."""

    outcome = "upstream_error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.headers: dict[str, str] = {}

    def extra_headers(self) -> dict[str, str]:
        return dict(self.headers)


class UpstreamError(GenerationError):
    """502: the provider answered with an error or with something unusable, or its answer
    broke off (the connection dropped mid-body or mid-stream)."""

    status_code = 502
    code = "upstream_error"
    message = "The model provider returned an error."
    outcome = "upstream_error"


class UpstreamUnavailable(GenerationError):
    """503: the circuit is open, the provider is unreachable or rate-limits us."""

    status_code = 503
    code = "upstream_unavailable"
    message = "The model provider is unavailable; try again later."
    outcome = "upstream_unavailable"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after)) if retry_after else None

    def extra_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class UpstreamTimeout(GenerationError):
    """504: the provider did not answer within the timeouts and retries allowed."""

    status_code = 504
    code = "upstream_timeout"
    message = "The model provider did not answer in time."
    outcome = "upstream_timeout"


class IdempotencyConflict(GenerationError):
    """409: the same Idempotency-Key is in flight, or was used for a different request."""

    status_code = 409
    code = "idempotency_conflict"
    message = "A request with this Idempotency-Key is already being processed."
