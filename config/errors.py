"""One error shape for the whole API: {"error": {"code", "message", ...details}}.

Services raise `ApiError` subclasses (declared in each app's errors.py); the DRF exception
handler below renders them, DRF's own exceptions and Django's 404/validation errors in the
shape of API.md. Anything unexpected is logged, reported to Sentry and answered as a
generic 500 `internal_error` carrying the request id and no traceback. Redis unreachable
where a view did not degrade on its own (staff cache statistics, invalidation) is a 503
`service_unavailable`, not a 500: the client may retry, and the service is not at fault;
so is a database that cannot be reached, or one whose migrations have not been applied
(a table or column the code asks for does not exist yet).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error

logger = logging.getLogger("tollgate.errors")


class ApiError(drf.APIException):
    """A failure with a stable snake_case code, an HTTP status and optional details.

    A DRF APIException, so that DRF's own machinery (authentication, permissions) treats it
    as a client error; rendered by `exception_handler` below.
    """

    status_code = 400
    code = "invalid_request"
    message = "The request is invalid."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        **details: Any,
    ) -> None:
        self.message = message or self.message
        if code:
            self.code = code
        if status:
            self.status_code = status
        self.details = details
        super().__init__(detail=self.message, code=self.code)

    def extra_headers(self) -> dict[str, str]:
        """Headers the response must carry (e.g. Retry-After)."""
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class InvalidRequest(ApiError):
    """400 invalid_request; its details always hold `fields` ({field: [messages]}), empty
    when no one field is at fault."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        details.setdefault("fields", {})
        super().__init__(message, **details)


class PermissionDeniedError(ApiError):
    status_code = 403
    code = "permission_denied"
    message = "You are not allowed to do this."


class AuthenticationError(ApiError):
    status_code = 401
    code = "authentication_failed"
    message = "Authentication credentials were not provided or are invalid."


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"
    message = "The request body is too large."


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"
    message = "The service is temporarily unavailable."


def _drf_to_api_error(exc: drf.APIException) -> ApiError:  # noqa: PLR0911 - a lookup table
    if isinstance(exc, drf.ValidationError):
        return InvalidRequest("The request body is invalid.", fields=_fields(exc.detail))
    if isinstance(exc, drf.ParseError):
        message = f"Malformed request body: {exc.detail}"
        return InvalidRequest(message, fields={"body": [message]})
    if isinstance(exc, drf.UnsupportedMediaType):
        return ApiError(str(exc.detail), code="unsupported_media_type", status=415)
    if isinstance(exc, drf.AuthenticationFailed | drf.NotAuthenticated):
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else "authentication_failed"
        if code in ("not_authenticated", "authentication_failed"):
            code = "authentication_failed"
        return AuthenticationError(str(exc.detail), code=str(code))
    if isinstance(exc, drf.PermissionDenied):
        return PermissionDeniedError(str(exc.detail))
    if isinstance(exc, drf.NotFound):
        return ApiError(str(exc.detail), code="not_found", status=404)
    if isinstance(exc, drf.MethodNotAllowed):
        return ApiError(str(exc.detail), code="method_not_allowed", status=405)
    if isinstance(exc, drf.NotAcceptable):
        return ApiError(str(exc.detail), code="not_acceptable", status=406)
    if isinstance(exc, drf.Throttled):
        wait = getattr(exc, "wait", None)
        return ApiError(str(exc.detail), code="rate_limited", status=429, retry_after=wait)
    return ApiError(str(exc.detail), code=str(exc.default_code), status=exc.status_code)


def _fields(detail: Any) -> dict[str, list[str]]:
    """API.md's `fields`: {field: [messages]}, always a flat list of strings per top-level
    field; an error inside a list item or nested object is prefixed with its path
    (`0.role: ...`)."""
    if isinstance(detail, dict):
        return {str(k): _flatten(v) for k, v in detail.items()}
    return {"non_field_errors": _flatten(detail)}


def error_path(detail: Any) -> tuple[str, ...]:
    """The path to the first message of a DRF error detail: ("messages", "1", "content") for
    {"messages": {1: {"content": ["..."]}}}; a list of item errors ([{}, {"role": [...]}]) is
    entered at its first item in error. () for a detail that names no field."""
    path: list[str] = []
    while True:
        if isinstance(detail, dict) and detail:
            key, detail = next(iter(detail.items()))
            path.append(str(key))
        elif isinstance(detail, list) and any(isinstance(v, dict | list) and v for v in detail):
            index = next(i for i, v in enumerate(detail) if isinstance(v, dict | list) and v)
            path.append(str(index))
            detail = detail[index]
        else:
            return tuple(path)


def _flatten(value: Any, path: str = "") -> list[str]:
    prefix = f"{path}: " if path else ""
    if isinstance(value, dict):
        return [
            message
            for key, inner in value.items()
            for message in _flatten(inner, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            return [f"{prefix}{v}" for v in value]
        return [
            message
            for index, inner in enumerate(value)
            if inner
            for message in _flatten(inner, f"{path}.{index}" if path else str(index))
        ]
    return [f"{prefix}{value}"]


def render_error(err: ApiError, request_id: str | None = None) -> Response:
    body = err.as_dict()
    if request_id and err.status_code >= 500:
        body["error"].setdefault("request_id", request_id)
    response = Response(body, status=err.status_code)
    for name, value in err.extra_headers().items():
        response[name] = value
    return response


class _OutageLog:
    """How often a backing service's outage goes to the log: the first request it fails,
    with its traceback, then at most one line every `every` seconds, counting the requests
    answered 503 meanwhile, rather than a traceback per request (a 7-second PostgreSQL
    outage under load wrote 1,267 of them: bench/outage.py). Per process."""

    def __init__(self, service: str, level: int, every: float = 10.0) -> None:
        self.service, self.level, self.every = service, level, every
        self._lock = threading.Lock()
        self._last: float | None = None  # when a line was last written
        self._failed = 0  # requests failed since then

    def due(self) -> int | None:
        """Count one failed request; the number to report now (this one included), or None
        while the last line is recent."""
        now = time.monotonic()
        with self._lock:
            self._failed += 1
            if self._last is not None and now - self._last < self.every:
                return None
            self._last, failed, self._failed = now, self._failed, 0
            return failed

    def reset(self) -> None:
        with self._lock:
            self._last, self._failed = None, 0

    def report(self, exc: Exception, request_id: str | None) -> None:
        """Count the request `exc` failed; log it if a line is due."""
        failed = self.due()
        if failed is not None:
            logger.log(
                self.level,
                "%s unreachable: %d requests answered 503 since the last such line",
                self.service,
                failed,
                exc_info=exc,
                extra={"request_id": request_id},
            )


_redis_away = _OutageLog("redis", logging.WARNING)
_database_away = _OutageLog("database", logging.ERROR)


def _is_redis_unreachable(exc: Exception) -> bool:
    """Redis did not answer, or answered that it cannot serve now: out of memory, read-only
    (a master demoted by a failover), a cluster slot down or moving. README: a Redis that
    answers but cannot write counts as unreachable (as for the quota engine)."""
    try:
        from django_redis.exceptions import ConnectionInterrupted
        from redis.exceptions import (
            ClusterDownError,
            OutOfMemoryError,
            ReadOnlyError,
            TryAgainError,
        )
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - both are in requirements/base.txt
        return False
    return isinstance(
        exc,
        ConnectionInterrupted
        | RedisConnectionError
        | RedisTimeoutError
        | OutOfMemoryError
        | ReadOnlyError
        | ClusterDownError
        | TryAgainError,
    )


# PostgreSQL's undefined_table and undefined_column: the schema is behind the code.
_NOT_MIGRATED_SQLSTATES = frozenset({"42P01", "42703"})


def is_database_not_migrated(exc: Exception) -> bool:
    """A query for a table or column the database does not have yet: `migrate` has not run
    (PostgreSQL's error codes; SQLite's "no such table/column" message)."""
    if not isinstance(exc, DatabaseError):
        return False
    if getattr(exc.__cause__, "sqlstate", None) in _NOT_MIGRATED_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and str(exc).startswith(
        ("no such table", "no such column")
    )


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF EXCEPTION_HANDLER: every error in the API.md shape."""
    request = context.get("request")
    request_id = getattr(request, "request_id", None) if request is not None else None
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = drf.ValidationError(as_serializer_error(exc))
    elif isinstance(exc, SuspiciousOperation):  # too many query fields, a bad Host...
        logger.warning("suspicious request: %s", exc, extra={"request_id": request_id})
        exc = InvalidRequest(f"The request is malformed: {exc}")

    if isinstance(exc, ApiError):
        err = exc
    elif _is_redis_unreachable(exc):
        _redis_away.report(exc, request_id)
        err = ServiceUnavailable("A backing service (Redis) is unreachable; try again shortly.")
    elif is_database_not_migrated(exc):
        # One line (the missing table or column), not a traceback per request.
        logger.error(
            "database not migrated: %s",
            str(exc).split("\n", 1)[0],
            extra={"request_id": request_id},
        )
        err = ServiceUnavailable(
            "The database is not ready: its migrations have not been applied. Try again shortly."
        )
    elif isinstance(exc, OperationalError | InterfaceError):
        _database_away.report(exc, request_id)
        err = ServiceUnavailable("The database is unreachable; try again shortly.")
    elif isinstance(exc, drf.APIException):
        err = _drf_to_api_error(exc)
        if isinstance(exc, drf.ValidationError) and request is not None and request.method == "GET":
            err.message = "The query parameters are invalid."
        wait = getattr(exc, "wait", None)
        if isinstance(exc, drf.Throttled) and wait:
            response = render_error(err, request_id)
            response["Retry-After"] = str(max(1, int(wait + 0.999)))
            return response
    else:
        logger.exception("unhandled error", extra={"request_id": request_id})
        try:
            import sentry_sdk

            sentry_sdk.capture_exception(exc)
        except Exception:  # noqa: BLE001, S110 - reporting must never mask the error
            pass
        err = ApiError("An unexpected error occurred.", code="internal_error", status=500)
    response = render_error(err, request_id)
    if response.status_code == 401:
        # RFC 9110: a 401 names the scheme it wants. DRF's own handler would add this for
        # its exceptions only; the contract's 401s (key_revoked...) are ours.
        response["WWW-Authenticate"] = _authenticate_header(context)
    return response


def _authenticate_header(context: dict[str, Any]) -> str:
    view, request = context.get("view"), context.get("request")
    header = None
    if view is not None and request is not None and hasattr(view, "get_authenticate_header"):
        header = view.get_authenticate_header(request)
    return header or 'Bearer realm="api"'
