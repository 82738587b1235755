from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connections

from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord
from quotas.services import usage_flush

pytestmark = pytest.mark.django_db(transaction=True)


def _ask_at_once(full_key: str, count: int) -> list[tuple[int, dict, str]]:
    """`count` identical requests sent at the same moment from as many threads:
    (status, body, X-Cache) of each."""
    from rest_framework.test import APIClient

    barrier = threading.Barrier(count)
    results: list[tuple[int, dict, str]] = []
    lock = threading.Lock()

    def ask() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
        barrier.wait()
        try:
            response = client.post(
                "/api/v1/generate", {"prompt": "same", "model": "gpt-test"}, format="json"
            )
            with lock:
                results.append((response.status_code, response.json(), response["X-Cache"]))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_identical_misses_call_upstream_once_and_are_charged_once(
    upstream_settings, fake_upstream, openai_model, api_key
):
    full_key, _ = api_key
    fake_upstream.default = Behaviour(kind="slow", delay=0.5, text="shared", usage=(100, 50))

    results = _ask_at_once(full_key, 4)

    assert [status for status, _, _ in results] == [200] * 4
    assert {body["text"] for _, body, _ in results} == {"shared"}
    assert len(fake_upstream.requests) == 1
    charged = [body for _, body, _ in results if body["cost_usd"] != "0"]
    assert len(charged) == 1
    assert sorted(cache for _, _, cache in results) == ["HIT", "HIT", "HIT", "MISS"]
    usage_flush()  # a late thread may have found the stored answer: its row is batched
    rows = UsageRecord.objects.all()
    assert rows.count() == 4  # every request counted once
    assert sum(r.cost_usd for r in rows) == Decimal(charged[0]["cost_usd"])
    assert [r.cached for r in rows].count(False) == 1


def test_requests_riding_on_another_upstream_call_name_the_layer_they_were_answered_from(
    upstream_settings, fake_upstream, openai_model, api_key
):
    full_key, _ = api_key
    # Slow enough that every other request arrives while the first one's call is out.
    fake_upstream.default = Behaviour(kind="slow", delay=0.5, text="shared", usage=(100, 50))

    results = _ask_at_once(full_key, 4)

    assert len(fake_upstream.requests) == 1
    [miss] = [body for _, body, cache in results if cache == "MISS"]
    riders = [body for _, body, cache in results if cache == "HIT"]
    assert (miss["cached"], miss["cache_layer"]) == (False, None)
    assert len(riders) == 3
    for body in riders:
        # Answered as any cache hit is: cached, free, and from a layer of the cache.
        assert body["cached"] is True
        assert body["cost_usd"] == "0"
        assert body["usage"]["total_tokens"] == 0
        assert body["cache_layer"] in ("memory", "redis")


def test_concurrent_subtopics_with_a_re_ask_call_upstream_once_and_are_charged_once(
    upstream_settings, fake_upstream, openai_model, api_key
):
    # A subtopics answer may take two upstream calls (a re-ask), each of them retried
    # within UPSTREAM_MAX_RETRY_SECONDS: here each call waits out a provider's Retry-After
    # of 1 s, so the pair outlasts one call's time (the retry budget plus one read).
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 1.5
    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.3
    busy = Behaviour(kind="status", status=429, retry_after="1")
    fake_upstream.script(
        busy,
        Behaviour(text="I cannot do JSON today.", usage=(100, 10)),
        busy,
        Behaviour(text='{"subtopics": ["X", "Y", "Z"]}', usage=(150, 20)),
    )
    fake_upstream.default = Behaviour(text='{"subtopics": ["P", "Q", "R"]}', usage=(100, 10))
    full_key, _ = api_key
    barrier = threading.Barrier(2)
    results: list[dict] = []

    def ask() -> None:
        from rest_framework.test import APIClient

        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
        barrier.wait()
        try:
            response = client.post(
                "/api/v1/topics/subtopics",
                {"topic": "Letters", "count": 3, "model": "gpt-test"},
                format="json",
            )
            results.append(response.json())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert [[n["label"] for n in body["nodes"]][1:] for body in results] == [["X", "Y", "Z"]] * 2
    assert len(fake_upstream.requests) == 4  # one answer: its two calls, each tried twice
    assert sorted(body["cost_usd"] == "0" for body in results) == [False, True]
