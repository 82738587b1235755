"""Request id, request log line and request-body bound.

The request id is taken from X-Request-ID when it is sane, else generated; it is bound to
every log line through a context variable and echoed on every response. Once the response
is ready, one structured `request` line is logged (endpoint, status, latency, cache result,
quota decision, user and key prefix; never the key itself) and the request is counted in
`tollgate_requests_total`.

Bodies of /api/ and /v1/ requests larger than API_MAX_BODY_BYTES are refused with 413
`payload_too_large` before any view reads them (the JSON parser does not go through
Django's DATA_UPLOAD_MAX_MEMORY_SIZE check).
"""

from __future__ import annotations

import contextvars
import io
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import structlog
from csp.constants import HEADER, HEADER_REPORT_ONLY
from csp.middleware import CheckableLazyObject
from csp.middleware import CSPMiddleware as BaseCSPMiddleware
from csp.utils import build_policy
from django.conf import settings
from django.contrib.messages.middleware import MessageMiddleware as BaseMessageMiddleware
from django.contrib.messages.storage import default_storage
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.urls import Resolver404, resolve
from django.utils.functional import SimpleLazyObject, empty
from django_prometheus.middleware import (
    PrometheusAfterMiddleware as BasePrometheusAfterMiddleware,
)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
_request_var: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "request", default=None
)
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_GUARDED_PREFIXES = ("/api/", "/v1/")
_UNLOGGED_PATHS = frozenset({"/health/live", "/health/ready", "/health/startup", "/metrics"})

access_log = structlog.get_logger("tollgate.request")


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request() -> HttpRequest | None:
    """The request this thread is serving, if any."""
    return _request_var.get()


def principal_of(request: Any) -> tuple[str | None, str | None]:
    """(user id, key prefix such as `tg_ab12cd34`) of a request, once authentication has run.

    Never triggers a session or database look-up: a user still behind Django's lazy
    object is not resolved.
    """
    attrs = getattr(request, "__dict__", {})
    user_id: str | None = None
    user = attrs.get("user")
    if user is not None:
        wrapped = getattr(user, "_wrapped", user)
        if wrapped is not empty:
            pk = getattr(wrapped, "pk", None)
            if pk is not None:
                user_id = str(pk)
    auth = attrs.get("auth")
    key_prefix = getattr(auth, "display", None) if auth is not None else None
    return user_id, key_prefix if isinstance(key_prefix, str) else None


def quota_decision_of(request: HttpRequest, response: HttpResponse) -> str:
    """What admission decided for this request, as far as the response tells.

    A view may state it exactly by setting `request.quota_decision`; otherwise a refusal
    is read from the 429 error body, a stale fallback and an admission from X-Cache (only
    generation responses carry it; other endpoints do not go through admission).
    """
    explicit = getattr(request, "quota_decision", None)
    if explicit:
        return str(explicit)
    if response.status_code == 429:
        error = _error_of(response)
        if error.get("scope") and error.get("dimension"):
            return f"denied:{error['scope']}.{error['dimension']}"
        return f"denied:{error.get('code') or 'unknown'}"
    cache = response.get("X-Cache")
    if cache == "STALE":
        return "fallback"
    if cache and response.status_code < 400:
        return "admitted"
    return "none"


def _error_of(response: HttpResponse) -> dict[str, Any]:
    data = getattr(response, "data", None)
    if data is None and response.get("Content-Type", "").startswith("application/json"):
        try:
            data = json.loads(response.content)
        except (ValueError, AttributeError):
            return {}
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]
    return {}


def _endpoint_of(request: HttpRequest) -> str:
    """The URL pattern (bounded cardinality), not the path."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "unmatched"
    return "/" + (match.route or match.view_name or "unnamed")


def payload_too_large(request: HttpRequest, limit: int) -> HttpResponse:
    """413 in the contract's shape (OpenAI's shape under /v1/)."""
    message = f"The request body is larger than {limit} bytes."
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "payload_too_large",
            }
        }
    else:
        body = {"error": {"code": "payload_too_large", "message": message}}
    response = HttpResponse(json.dumps(body), status=413, content_type="application/json")
    # Imported here: config.logging loads this module before the apps are ready. The
    # caller's credentials are read, never the body.
    from quotas.views import caller_headers

    for name, value in caller_headers(request).items():
        response[name] = value
    return response


def _body_too_large(request: HttpRequest, limit: int) -> bool:
    """True when the body exceeds `limit`; a body of unknown length is read up to it."""
    length = request.META.get("CONTENT_LENGTH")
    if length:
        try:
            return int(length) > limit
        except ValueError:
            return False
    # A chunked body has no length. Django itself ignores it (it reads CONTENT_LENGTH bytes,
    # i.e. none); when the server has de-chunked it (gunicorn sets wsgi.input_terminated),
    # read it here up to the limit so that the view gets it, bounded.
    stream = request.META.get("wsgi.input")
    if (
        request.META.get("HTTP_TRANSFER_ENCODING", "").lower() != "chunked"
        or not request.META.get("wsgi.input_terminated")
        or stream is None
    ):
        return False
    data = stream.read(limit + 1)
    if len(data) > limit:
        return True
    # Hand the (bounded) body on to the view as if it had been sent with a length.
    request._body = data  # type: ignore[attr-defined]
    request._stream = io.BytesIO(data)  # type: ignore[attr-defined]
    request.META["CONTENT_LENGTH"] = str(len(data))
    return False


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if _VALID.match(incoming) else new_request_id()
        request.request_id = request_id  # type: ignore[attr-defined]
        token = request_id_var.set(request_id)
        request_token = _request_var.set(request)
        try:
            limit = settings.API_MAX_BODY_BYTES
            if request.path.startswith(_GUARDED_PREFIXES) and _body_too_large(request, limit):
                response = payload_too_large(request, limit)
            else:
                response = self.get_response(request)
            response["X-Request-ID"] = request_id
            self._record(request, response, started)
        finally:
            _request_var.reset(request_token)
            request_id_var.reset(token)
        return response

    @staticmethod
    def _record(request: HttpRequest, response: HttpResponse, started: float) -> None:
        from health.metrics import REQUESTS, series

        endpoint = _endpoint_of(request)
        cache = response.get("X-Cache", "none")
        series(REQUESTS, endpoint, str(response.status_code), cache).inc()
        if request.path in _UNLOGGED_PATHS:
            return  # probes and scrapes every few seconds would drown the log
        access_log.info(
            "request",
            method=request.method,
            endpoint=endpoint,
            status=response.status_code,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            cache=cache,
            quota=quota_decision_of(request, response),
        )


class ProbeMiddleware:
    """The probes and /metrics answer whatever the Host header says.

    The kubelet's probes, Docker's HEALTHCHECK and Prometheus address a replica by its IP
    (`Host: 10.1.2.3:8000`), which is no name of ALLOWED_HOSTS: through Django's host
    check every probe would be a 400 and a pod would never start. For these four paths
    (whose views read no host) the host is taken as sent; the request goes through every
    other middleware as before, and every other path is still checked.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info in _UNLOGGED_PATHS:
            # The Host as sent (no ALLOWED_HOSTS check): these views read no host.
            host = request.META.get("HTTP_HOST") or request.META.get("SERVER_NAME", "")
            request.get_host = lambda: host  # type: ignore[method-assign]
        return self.get_response(request)


# Set by django-csp's view decorators (csp_update & co.) to change one response's policy.
_CSP_OVERRIDES = tuple(
    f"_csp_{kind}{ro}" for kind in ("config", "update", "replace") for ro in ("", "_ro")
)
_csp_policies: dict[bool, str] = {}


@receiver(setting_changed)
def _csp_settings_changed(*, setting: str, **_: Any) -> None:
    if setting.startswith("CONTENT_SECURITY_POLICY"):
        _csp_policies.clear()


class CSPMiddleware(BaseCSPMiddleware):
    """django-csp's middleware, with the settings' policy built once per process.

    django-csp builds the header again for every response (a deep copy of the settings,
    then every directive joined), which costs a tenth of a cache hit. A response whose view
    changed nothing (no csp_update & co.) and used no nonce always gets the settings'
    policy: here it is built once, and again only if the settings change. Any other
    response goes through django-csp itself.
    """

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        if (
            getattr(request, "_csp_nonce", None) is not None
            or any(hasattr(response, name) for name in _CSP_OVERRIDES)
            or (settings.DEBUG and response.status_code in (404, 500))
        ):
            return super().process_response(request, response)
        for report_only, header, setting in (
            (False, HEADER, "CONTENT_SECURITY_POLICY"),
            (True, HEADER_REPORT_ONLY, "CONTENT_SECURITY_POLICY_REPORT_ONLY"),
        ):
            policy = _csp_policies.get(report_only)
            if policy is None:
                policy = _csp_policies[report_only] = build_policy(report_only=report_only)
            exempt = getattr(response, "_csp_exempt_ro" if report_only else "_csp_exempt", False)
            excluded = (getattr(settings, setting, None) or {}).get("EXCLUDE_URL_PREFIXES") or ()
            if (
                policy
                and header not in response
                and exempt is False
                and not request.path_info.startswith(tuple(excluded))
            ):
                response[header] = policy
        request.csp_nonce = CheckableLazyObject(self._csp_nonce_post_response)  # type: ignore[attr-defined]
        return response


class MessageMiddleware(BaseMessageMiddleware):
    """Django's message middleware, with the message storage built on first use.

    Django's builds the storage (a cookie signer, a cookie and a session backend) for every
    request and writes it back on every response: over a tenth of the CPU of a bare
    request through the whole stack, for messages that only the admin sends. Here the
    storage is built when something first reads or adds a message, and the response of a
    request that never did is left as it is, which is what the storage's own update would
    do with it.
    """

    def process_request(self, request: HttpRequest) -> None:
        request._messages = SimpleLazyObject(lambda: default_storage(request))  # type: ignore[attr-defined]

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        stored = getattr(request, "_messages", None)
        if isinstance(stored, SimpleLazyObject) and stored._wrapped is empty:
            return response
        return super().process_response(request, response)


class PrometheusAfterMiddleware(BasePrometheusAfterMiddleware):
    """django-prometheus's request metrics, each labelled series looked up once.

    The middleware updates about eight labelled series per request, and prometheus_client
    checks and joins the label values again for every `labels()` call. `label_metric` is
    django-prometheus's own hook for the labels; here it keeps each series it has looked up.
    The label values (view, method, status, transport, charset) are few, so is the dict.
    """

    _series: ClassVar[dict[tuple[Any, ...], Any]] = {}

    def label_metric(
        self, metric: Any, request: HttpRequest, response: Any = None, **labels: Any
    ) -> Any:
        if not labels:
            return metric
        key = (id(metric), *labels.items())
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(**labels)
        return series
