"""The cache tier on the real request path: POST /api/v1/generate against the fake
upstream (a real HTTP server on loopback), real Redis and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django_redis import get_redis_connection
from rest_framework.test import APIClient

from caching.services import cache_expire, cache_get_stale, cache_local_reset, cache_stats
from caching.tier import tier
from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord
from quotas.tests.factories import PlanFactory, UserQuotaFactory

URL = "/api/v1/generate"


@pytest.fixture(autouse=True)
def _clean(redis_conn):
    cache_local_reset()


def _generation_keys() -> list[str]:
    """The logical keys of the generation answers stored in Redis."""
    t = tier()
    keys = [name for batch in t.scan_matching("gen:*") for name in batch]
    head = len(t.prefix) + 2
    return [f"{ns}:{rest}" for ns, _, rest in (k[head:].split(":", 2) for k in keys)]


@pytest.mark.django_db(transaction=True)
def test_50_concurrent_identical_requests_make_one_upstream_call(
    upstream_settings, fake_upstream, openai_model, api_key
):
    fake_upstream.default = Behaviour(kind="slow", delay=0.5, text="one answer", usage=(10, 5))
    full_key, _ = api_key
    barrier = threading.Barrier(50)
    responses: list = []
    lock = threading.Lock()

    def one_request() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
        barrier.wait()
        try:
            response = client.post(URL, {"prompt": "Same", "model": "gpt-test"}, format="json")
            with lock:
                responses.append(response)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_request) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(fake_upstream.requests) == 1
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.json()["text"] for r in responses} == {"one answer"}
    caches = sorted(r["X-Cache"] for r in responses)
    assert caches == ["HIT"] * 49 + ["MISS"]
    charged = [r.json() for r in responses if r.json()["cost_usd"] != "0"]
    assert len(charged) == 1
    assert all(r.json()["cached"] for r in responses if r["X-Cache"] == "HIT")
    assert UsageRecord.objects.count() == 50  # every request counted, one paid


@pytest.mark.django_db
def test_quota_exhausted_serves_stale_copy_with_fallback_flags(
    upstream_settings, fake_upstream, openai_model, api_key, user
):
    UserQuotaFactory(user=user, plan=PlanFactory(requests_per_minute=1, allow_stale_fallback=True))
    fake_upstream.default = Behaviour(text="the answer", usage=(10, 5))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    first = client.post(URL, {"prompt": "popular", "model": "gpt-test"}, format="json")
    assert first.status_code == 200
    [key] = _generation_keys()
    assert cache_expire(key)  # past its fresh TTL: only the stale copy is left

    again = client.post(URL, {"prompt": "popular", "model": "gpt-test"}, format="json")

    assert again.status_code == 200, again.content
    assert again["X-Cache"] == "STALE"
    body = again.json()
    assert body["fallback"] is True
    assert body["cached"] is True
    assert body["text"] == "the answer"
    assert body["cost_usd"] == "0"
    assert len(fake_upstream.requests) == 1
    assert cache_stats()["stale"]["hits"] == 1


@pytest.mark.django_db
def test_quota_exhausted_without_stale_copy_is_429(
    upstream_settings, fake_upstream, openai_model, api_key, user
):
    UserQuotaFactory(user=user, plan=PlanFactory(requests_per_minute=1, allow_stale_fallback=True))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    assert client.post(URL, {"prompt": "a", "model": "gpt-test"}, format="json").status_code == 200

    other = client.post(URL, {"prompt": "never asked", "model": "gpt-test"}, format="json")

    assert other.status_code == 429
    assert other.json()["error"]["code"] == "quota_exceeded"
    assert int(other["Retry-After"]) >= 1
    # A refused admission takes no single-flight lock: nobody waits for an answer that
    # will not come.
    assert not list(get_redis_connection("default").scan_iter("*lock:*"))


@pytest.mark.django_db
def test_quota_exhausted_with_stale_copy_but_no_fallback_allowed_is_429(
    upstream_settings, fake_upstream, openai_model, api_key, user
):
    UserQuotaFactory(user=user, plan=PlanFactory(requests_per_minute=1, allow_stale_fallback=False))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    assert client.post(URL, {"prompt": "p", "model": "gpt-test"}, format="json").status_code == 200
    [key] = _generation_keys()
    cache_expire(key)
    assert cache_get_stale(key) is not None

    again = client.post(URL, {"prompt": "p", "model": "gpt-test"}, format="json")

    assert again.status_code == 429
    assert again.json()["error"]["code"] == "quota_exceeded"


@pytest.mark.django_db
def test_invalidated_answer_is_generated_again(
    upstream_settings, fake_upstream, openai_model, api_key, admin_user
):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    fake_upstream.default = Behaviour(text="v1")
    assert (
        client.post(URL, {"prompt": "q", "model": "gpt-test"}, format="json").json()["text"] == "v1"
    )
    staff = APIClient()
    staff.force_authenticate(admin_user)
    assert staff.post("/api/v1/cache/invalidate", {"pattern": "gen:*"}, format="json").json() == {
        "invalidated": 1
    }
    fake_upstream.default = Behaviour(text="v2")

    again = client.post(URL, {"prompt": "q", "model": "gpt-test"}, format="json")

    assert again["X-Cache"] == "MISS"
    assert again.json()["text"] == "v2"


@pytest.mark.django_db
def test_a_miss_makes_two_redis_round_trips_and_a_hit_one(
    upstream_settings, fake_upstream, openai_model, api_key, redis_round_trips
):
    # A miss: the admission (which looks the answer up and takes the single-flight lock in
    # the same script), then the settlement with the answer's store and the lock's release.
    # A hit in memory or in Redis: the one call that counts the request. The fewest of
    # five: the invalidation poll adds one round trip per worker every 0.25 s.
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    client.post(URL, {"prompt": "warm-up", "model": "gpt-test"}, format="json")
    trips: dict[str, list[int]] = {"MISS": [], "memory": [], "redis": []}
    for i in range(5):
        body = {"prompt": f"question {i}", "model": "gpt-test"}
        for expected in ("MISS", "memory", "redis"):
            if expected == "redis":  # as another worker would: the answer is in Redis only
                cache_local_reset()
                tier().sync(force=True)  # a new process's first invalidation poll
            redis_round_trips.count = 0
            response = client.post(URL, body, format="json")
            trips[expected].append(redis_round_trips.count)
            assert response.status_code == 200, response.content
            got = response["X-Cache"] if expected == "MISS" else response.json()["cache_layer"]
            assert got == expected

    assert {name: min(counts) for name, counts in trips.items()} == {
        "MISS": 2,
        "memory": 1,
        "redis": 1,
    }
    assert len(fake_upstream.requests) == 6  # the warm-up and five misses
    assert not list(get_redis_connection("default").scan_iter("*lock:*"))


@pytest.mark.django_db
def test_answer_in_redis_is_served_past_a_spent_token_budget_and_counted_as_a_request(
    upstream_settings, fake_upstream, openai_model, api_key, user
):
    # The admission script finds the answer and counts a hit: request windows only.
    plan = PlanFactory(requests_per_minute=3, tokens_per_minute=300, allow_stale_fallback=False)
    UserQuotaFactory(user=user, plan=plan)
    fake_upstream.default = Behaviour(text="the answer", usage=(10, 150))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    body = {"prompt": "cached", "model": "gpt-test", "max_tokens": 200}
    assert client.post(URL, body, format="json").status_code == 200  # 160 of 300 tokens
    cache_local_reset()  # another worker: the answer is in Redis only

    hit = client.post(URL, body, format="json")
    new = client.post(URL, {**body, "prompt": "new question"}, format="json")
    third = client.post(URL, body, format="json")  # a refusal consumed nothing
    over = client.post(URL, body, format="json")

    assert (hit.status_code, hit["X-Cache"], hit.json()["cache_layer"]) == (200, "HIT", "redis")
    assert hit["X-RateLimit-Remaining-Requests"] == "1"
    # Every authenticated response carries the token headers; a hit's are read, not spent.
    assert (hit["X-RateLimit-Limit-Tokens"], hit["X-RateLimit-Remaining-Tokens"]) == ("300", "140")
    assert new.status_code == 429
    assert new.json()["error"]["dimension"] == "tokens_per_minute"
    assert third.status_code == 200
    assert third.json()["cache_layer"] == "memory"
    assert third["X-RateLimit-Remaining-Tokens"] == "140"
    assert over.status_code == 429  # the fourth request of the minute, hit or not
    assert over.json()["error"]["dimension"] == "requests_per_minute"
    assert len(fake_upstream.requests) == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("upstream_settings", "openai_model")
@pytest.mark.parametrize("layer", ["memory", "redis"])
def test_a_hit_is_served_when_the_tokens_spent_are_over_the_limit(
    fake_upstream, api_key, user, layer
):
    # The provider reported more than the estimate reserved: the window is over its limit.
    UserQuotaFactory(user=user, plan=PlanFactory(tokens_per_minute=300))
    fake_upstream.default = Behaviour(text="long answer", usage=(10, 400))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    body = {"prompt": "over", "model": "gpt-test", "max_tokens": 200}
    assert client.post(URL, body, format="json").status_code == 200
    if layer == "redis":
        cache_local_reset()

    hit = client.post(URL, body, format="json")

    assert (hit.status_code, hit.json()["cache_layer"]) == (200, layer), hit.content
    assert (hit["X-RateLimit-Limit-Tokens"], hit["X-RateLimit-Remaining-Tokens"]) == ("300", "0")


@pytest.mark.django_db
def test_a_streamed_miss_makes_two_redis_round_trips_takes_no_lock_and_is_stored(
    upstream_settings, fake_upstream, openai_model, api_key, redis_round_trips
):
    fake_upstream.default = Behaviour(text="streamed answer", usage=(5, 3))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    client.post(URL, {"prompt": "warm-up", "model": "gpt-test"}, format="json")
    trips = []
    for i in range(5):
        body = {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": f"stream {i}"}],
            "stream": True,
        }
        redis_round_trips.count = 0
        response = client.post("/v1/chat/completions", body, format="json")
        events = b"".join(response.streaming_content)
        trips.append(redis_round_trips.count)
        assert b"data: [DONE]" in events

    assert min(trips) == 2  # admission with the look-up; settlement with the store
    assert not list(get_redis_connection("default").scan_iter("*lock:*"))
    cache_local_reset()
    again = client.post(URL, {"prompt": "stream 0", "model": "gpt-test"}, format="json")
    assert (again["X-Cache"], again.json()["cache_layer"]) == ("HIT", "redis")
    assert again.json()["text"] == "streamed answer"


@pytest.mark.django_db
@pytest.mark.usefixtures("upstream_settings", "fake_upstream", "openai_model")
def test_a_refusal_makes_one_redis_round_trip_with_or_without_a_stale_copy(
    api_key, user, redis_round_trips
):
    # The refusing admission has looked the answer up already: a stale copy comes back in
    # its reply, and no copy needs no second look.
    plan = PlanFactory(requests_per_minute=1, allow_stale_fallback=True)
    UserQuotaFactory(user=user, plan=plan)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    assert (
        client.post(URL, {"prompt": "stored", "model": "gpt-test"}, format="json").status_code
        == 200
    )
    cache_local_reset()  # as on another worker: the stored answer is in Redis only
    tier().sync(force=True)
    trips = {}
    for prompt, expected in (("never asked", 429), ("stored", 200)):
        redis_round_trips.count = 0
        response = client.post(URL, {"prompt": prompt, "model": "gpt-test"}, format="json")
        trips[prompt] = redis_round_trips.count
        assert response.status_code == expected, response.content

    assert response.json()["fallback"] is True
    assert trips == {"never asked": 1, "stored": 1}
