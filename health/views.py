"""Probes and the Prometheus scrape endpoint: plain Django views without authentication
(but METRICS_TOKEN on /metrics) or session. A probe does nothing beyond its checks; a
scrape also reads the shared quota headroom and the circuit states from Redis."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.utils.cache import add_never_cache_headers
from django.views import defaults
from django.views.decorators.cache import never_cache
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from config.middleware import request_id_var
from health import probes
from health.gauges import shared_gauges_refresh
from quotas.views import caller_headers

logger = logging.getLogger(__name__)
_READ_METHODS = ("GET", "HEAD")


def _read_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """GET and HEAD only, as Django's require_safe, but any other method is answered with
    a JSON 405 in the API's error shape and `Allow: GET, HEAD`. Exempt from CSRF: nothing
    here changes state, and without the exemption CsrfViewMiddleware answers a POST with
    Django's HTML 403 page before the view can refuse the method. It takes the place of
    require_GET, so a probe's GET does no more work than before."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in _READ_METHODS:
            return _method_not_allowed(request)
        return view(request, *args, **kwargs)

    wrapper.csrf_exempt = True  # type: ignore[attr-defined]  # what csrf_exempt sets
    return wrapper


def _method_not_allowed(request: HttpRequest) -> HttpResponse:
    response = JsonResponse(
        {
            "error": {
                "code": "method_not_allowed",
                "message": f'Method "{request.method}" not allowed.',
            }
        },
        status=405,
    )
    response["Allow"] = ", ".join(_READ_METHODS)
    add_never_cache_headers(response)  # a 405 is heuristically cacheable (RFC 9110)
    return response


@_read_only
@never_cache
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@_read_only
@never_cache
def ready(request: HttpRequest) -> JsonResponse:
    status, checks = probes.readiness_report()
    return JsonResponse(
        {"status": status, "checks": checks}, status=503 if status == "fail" else 200
    )


@_read_only
@never_cache
def startup(request: HttpRequest) -> JsonResponse:
    try:
        done = probes.migrations_applied()
    except Exception as exc:  # noqa: BLE001 - an unreachable database means "not started"
        return JsonResponse({"status": "fail", "error": type(exc).__name__}, status=503)
    if not done:
        return JsonResponse({"status": "fail", "error": "migrations pending"}, status=503)
    return JsonResponse({"status": "ok"})


def _registry() -> CollectorRegistry:
    """Every worker's samples under gunicorn (multiprocess mode), this process's otherwise."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def _authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # As bytes: compare_digest refuses (TypeError, a 500) a str that is not ASCII.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


@_read_only
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse(
            "metrics require a bearer token\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    shared_gauges_refresh()
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


def _api_error(
    request: HttpRequest,
    *,
    status: int,
    code: str,
    message: str,
    openai_type: str,
    **details: Any,
) -> JsonResponse | None:
    """The contract's error body under /api/ (OpenAI's under /v1/); None elsewhere."""
    request_id = getattr(request, "request_id", None) or request_id_var.get()
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {
            "error": {"message": message, "type": openai_type, "param": None, "code": code}
        }
    elif request.path.startswith("/api/"):
        body = {"error": {"code": code, "message": message, **details}}
    else:
        return None
    if status >= 500 and request_id:
        body["error"]["request_id"] = request_id
    return JsonResponse(body, status=status)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler400 (e.g. a disallowed Host header, a malformed request line)."""
    response = _api_error(
        request,
        status=400,
        code="invalid_request",
        message="The request is malformed.",
        openai_type="invalid_request_error",
        fields={},
    )
    return response or defaults.bad_request(request, exception or Exception("bad request"))


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: an unknown URL under /api/ or /v1/ answers in the contract's shape."""
    response = _api_error(
        request,
        status=404,
        code="not_found",
        message=f"No endpoint at {request.path}.",
        openai_type="invalid_request_error",
    )
    if response is None:
        return defaults.page_not_found(request, exception)
    for name, value in caller_headers(request).items():
        response[name] = value
    return response


def api_not_found(request: HttpRequest) -> HttpResponse:
    """An unknown URL under /api/ or /v1/, whatever the method: the contract's 404. But a
    GET of a page that exists with a trailing slash (the schema, its docs) is sent there,
    as Django's APPEND_SLASH would do if this catch-all did not match first."""
    path = request.path_info
    if request.method in _READ_METHODS and not path.endswith("/"):
        try:
            match = resolve(f"{path}/")
        except Resolver404:
            match = None
        if match is not None and match.url_name != "api-not-found":
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
    return page_not_found(request)


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: an error that escaped a plain Django view or a middleware.

    Under /api/ and /v1/ the body is the contract's error shape (OpenAI's under /v1/) with
    the request id and no traceback; elsewhere (the admin) Django's own 500 page.
    """
    response = _api_error(
        request,
        status=500,
        code="internal_error",
        message="An unexpected error occurred.",
        openai_type="server_error",
    )
    return response or defaults.server_error(request)
