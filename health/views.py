"""Probes and the Prometheus scrape endpoint: plain Django views, no authentication (but
METRICS_TOKEN on /metrics), no session, no database work beyond the checks themselves."""

from __future__ import annotations

import hmac
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from health import probes


@never_cache
@require_GET
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def ready(request: HttpRequest) -> JsonResponse:
    status, checks = probes.readiness_report()
    return JsonResponse(
        {"status": status, "checks": checks}, status=503 if status == "fail" else 200
    )


@never_cache
@require_GET
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
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse(
            "metrics require a bearer token\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
