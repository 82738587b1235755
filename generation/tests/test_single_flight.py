from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connections

from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord
from quotas.services import usage_flush

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_identical_misses_call_upstream_once_and_are_charged_once(
    upstream_settings, fake_upstream, openai_model, api_key
):
    from rest_framework.test import APIClient

    full_key, _ = api_key
    fake_upstream.default = Behaviour(kind="slow", delay=0.5, text="shared", usage=(100, 50))
    barrier = threading.Barrier(4)
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

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

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
