from __future__ import annotations

import time

import pytest

from health.tests.test_gunicorn_metrics import _sample
from quotas.models import GlobalLimits, ProviderQuota

pytestmark = pytest.mark.django_db


def test_scrape_reports_shared_quota_headroom_and_open_circuits_from_redis(client, redis_conn):
    limits = GlobalLimits.load()
    limits.requests_per_hour = 1000
    limits.save()
    ProviderQuota.objects.create(
        provider="openai", model="", requests_per_minute=100, safety_margin="0.80"
    )
    redis_conn.hset(
        "tg:cb:openai:gpt-test", mapping={"state": "open", "failures": 5, "opened_at": time.time()}
    )
    text = client.get("/metrics").content.decode()
    assert (
        _sample(text, "tollgate_quota_remaining", scope="global", dimension="requests_per_hour")
        == 1000
    )
    assert (
        _sample(text, "tollgate_quota_remaining", scope="provider", dimension="requests_per_minute")
        == 80
    )
    assert _sample(text, "tollgate_circuit_state", provider="openai", model="gpt-test") == 2


def test_scrape_answers_with_redis_down(client, settings, caplog):
    from quotas.services import local_state_reset

    GlobalLimits.objects.update_or_create(pk=1, defaults={"requests_per_hour": 100})
    closed = "redis://127.0.0.1:1/3"
    settings.REDIS_URL = closed
    settings.CACHES = {
        **settings.CACHES,
        "default": {**settings.CACHES["default"], "LOCATION": closed},
    }
    local_state_reset()  # forget the quota backend bound to the working Redis
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"tollgate_requests_total" in response.content
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "shared quota gauges not refreshed: quota counters unavailable (Redis unreachable)"
        in messages
    )
    assert "circuit states unavailable (Redis down)" in messages


def test_scrape_reports_database_and_cache_metrics(client, redis_conn):
    from django.core.cache import cache

    cache.set("metrics-probe", 1)
    cache.get("metrics-probe")
    cache.get("metrics-absent")
    client.get("/health/ready")  # runs a query on the default database
    text = client.get("/metrics").content.decode()
    assert _sample(text, "django_db_execute_total", alias="default", vendor="postgresql") > 0
    assert _sample(text, "django_cache_get_hits_total", backend="redis") > 0
    assert _sample(text, "django_cache_get_misses_total", backend="redis") > 0


def test_request_metrics_keep_counting_each_series_on_its_own(client):
    def scrape() -> str:
        return client.get("/metrics").content.decode()

    def count(text: str, status: str, method: str) -> float:
        return (
            _sample(
                text,
                "django_http_responses_total_by_status_view_method_total",
                status=status,
                view="health-live",
                method=method,
            )
            or 0.0
        )

    before = scrape()
    for _ in range(3):
        assert client.get("/health/live").status_code == 200
    assert client.post("/health/live").status_code == 405
    after = scrape()

    assert count(after, "200", "GET") - count(before, "200", "GET") == 3
    assert count(after, "405", "POST") - count(before, "405", "POST") == 1


def test_scrape_reports_a_circuit_closed_once_redis_no_longer_holds_it(client, redis_conn):
    from generation.resilience import Breaker

    # This worker called the model while its circuit was closed (and remembers having said so).
    Breaker("openai", "gpt-test").allow()
    redis_conn.hset(
        "tg:cb:openai:gpt-test", mapping={"state": "open", "failures": 5, "opened_at": time.time()}
    )
    text = client.get("/metrics").content.decode()
    assert _sample(text, "tollgate_circuit_state", provider="openai", model="gpt-test") == 2
    # Another replica's probe succeeded: the circuit is closed, its hash deleted.
    redis_conn.delete("tg:cb:openai:gpt-test")
    text = client.get("/metrics").content.decode()
    assert _sample(text, "tollgate_circuit_state", provider="openai", model="gpt-test") == 0


def test_scrape_reports_the_headroom_of_each_provider_on_its_own(client, redis_conn):
    ProviderQuota.objects.create(
        provider="openai", model="", requests_per_minute=100, safety_margin="0.80"
    )
    ProviderQuota.objects.create(
        provider="gemini", model="gemini-test", requests_per_minute=10, safety_margin="0.80"
    )
    text = client.get("/metrics").content.decode()
    headroom = {
        labels: value
        for labels in (("openai", "*"), ("gemini", "gemini-test"))
        if (
            value := _sample(
                text,
                "tollgate_quota_remaining",
                scope="provider",
                dimension="requests_per_minute",
                provider=labels[0],
                model=labels[1],
            )
        )
    }
    # Each provider's headroom is a series of its own: one provider out of requests must
    # not hide behind another's (TollgateSharedQuotaExhausted takes the minimum).
    assert headroom == {("openai", "*"): 80, ("gemini", "gemini-test"): 8}


def test_a_removed_provider_limit_reads_as_no_limit_not_its_last_headroom(client, redis_conn):
    quota = ProviderQuota.objects.create(
        provider="openai", model="", requests_per_minute=0, safety_margin="0.80"
    )
    labels = {
        "scope": "provider",
        "dimension": "requests_per_minute",
        "provider": "openai",
        "model": "*",
    }
    exhausted = _sample(
        client.get("/metrics").content.decode(), "tollgate_quota_remaining", **labels
    )
    assert exhausted == 0  # TollgateSharedQuotaExhausted fires

    quota.delete()  # the operator lifts the limit

    # Its series must not hold 0 (the alert would fire for good): no limit, no bound.
    text = client.get("/metrics").content.decode()
    assert _sample(text, "tollgate_quota_remaining", **labels) == float("inf")
