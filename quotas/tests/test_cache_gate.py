"""The admission script looking a cache entry up in the same round trip (CacheGate), on
the real Redis: a fresh answer turns the request into a counted hit, anything else into a
full admission that takes the single-flight lock; exact under concurrency."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.db import connection

from quotas import services
from quotas.errors import QuotaExceeded
from quotas.services import CacheGate

pytestmark = pytest.mark.django_db

NOW = 1_795_000_000.0  # a fixed moment, far from a minute boundary
ENTRY, LOCK = "gate-test:entry", "gate-test:lock"


def store(redis_conn, *, fresh_for: float, now: float = NOW, body: str = '{"a":1}'):
    """A cache entry as the cache tier writes it: "<fresh_until> <stale_until>\\n<json>"."""
    fresh_until = now + fresh_for
    stale_for = 3600
    redis_conn.set(ENTRY, f"{fresh_until:.3f} {fresh_until + stale_for:.3f}\n{body}")


def admit(user, *, token="t1", now=NOW, request_id=None):  # noqa: S107 - a lock token
    return services.admission_admit(
        user_id=user.pk,
        key_id=None,
        model="local/demo",
        request_id=request_id or uuid.uuid4().hex,
        prompt_tokens=10,
        max_tokens=20,
        now=now,
        gate=CacheGate(entry=ENTRY, lock=LOCK, token=token, lock_ms=30_000),
    )


def used(user, dimension):
    return services.quota_standing(user_id=user.pk, now=NOW)["limits"][dimension]["used"]


def test_fresh_entry_counts_a_hit_requests_only_and_takes_no_lock(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=5, tokens_per_minute=1000, concurrency=1)
    store(redis_conn, fresh_for=60)

    admission = admit(user)

    assert admission.cached
    assert admission.entry.endswith(b'{"a":1}')
    assert not admission.locked
    assert redis_conn.exists(LOCK) == 0
    assert used(user, "requests_per_minute") == 1
    assert used(user, "tokens_per_minute") == 0
    assert used(user, "concurrency") == 0  # a hit holds no lease
    assert {w.quota.kind for w in admission.windows} == {"r", "t"}  # tokens read, not spent
    assert admission.headers()["X-RateLimit-Remaining-Requests"] == "4"
    assert admission.headers()["X-RateLimit-Remaining-Tokens"] == "1000"


def test_no_entry_admits_in_full_and_takes_the_lock_once(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=5, tokens_per_minute=1000)

    first = admit(user, token="first")
    second = admit(user, token="second")

    assert (first.cached, first.entry, first.locked) == (False, None, True)
    assert (second.cached, second.locked) == (False, False)  # it will wait for the first
    assert redis_conn.get(LOCK) == b"first"
    assert 29_000 < redis_conn.pttl(LOCK) <= 30_000
    assert used(user, "tokens_per_minute") == 2 * (10 + 20)


def test_stale_entry_admits_in_full_and_hands_the_stale_copy_back(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=5, tokens_per_minute=1000)
    store(redis_conn, fresh_for=-1)  # past its fresh time, within its stale time

    admission = admit(user)

    assert not admission.cached
    assert admission.locked
    assert admission.entry.endswith(b'{"a":1}')
    assert used(user, "tokens_per_minute") == 30


def test_refused_in_full_takes_no_lock_and_carries_the_stale_copy(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=5, tokens_per_minute=40)
    admit(user, token="ok")  # 30 tokens reserved
    redis_conn.delete(LOCK)
    store(redis_conn, fresh_for=-1)

    with pytest.raises(QuotaExceeded) as info:
        admit(user, token="refused")

    assert info.value.dimension == "tokens_per_minute"
    assert info.value.looked_up
    assert info.value.entry.endswith(b'{"a":1}')
    assert redis_conn.exists(LOCK) == 0


def test_refused_with_nothing_stored_says_it_looked(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=1)
    admit(user, token="ok")
    redis_conn.delete(LOCK)

    with pytest.raises(QuotaExceeded) as info:
        admit(user, token="refused")

    assert (info.value.looked_up, info.value.entry) == (True, None)  # no copy: no second look


def test_a_fresh_entry_passes_a_full_token_budget_but_not_a_full_request_window(
    redis_conn, user, plan_for
):
    plan_for(user, requests_per_minute=2, tokens_per_minute=40)
    admit(user)  # 30 of 40 tokens: a miss would be refused now
    store(redis_conn, fresh_for=60)

    assert admit(user).cached  # the answer costs no tokens
    with pytest.raises(QuotaExceeded) as info:
        admit(user)  # but the request window is full

    assert info.value.dimension == "requests_per_minute"
    assert info.value.entry.endswith(b'{"a":1}')  # for the stale fallback, if allowed


def test_in_process_backend_does_not_look_at_the_gate(settings, redis_conn, user, plan_for):
    settings.REDIS_URL = ""
    services.local_state_reset()
    plan_for(user, requests_per_minute=5)
    store(redis_conn, fresh_for=60)

    admission = admit(user)

    assert (admission.cached, admission.entry, admission.locked) == (False, None, False)
    assert admission.backend == "local"
    for _ in range(4):
        admit(user)
    with pytest.raises(QuotaExceeded) as info:
        admit(user)
    assert not info.value.looked_up  # the caller must look for a stale copy itself


@pytest.mark.django_db(transaction=True)  # the requests run in threads
def test_gated_hits_and_misses_racing_are_admitted_exactly_to_the_limit(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=20)
    store(redis_conn, fresh_for=3600, now=time.time())
    barrier = threading.Barrier(40)
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            gate = i % 2 == 0  # half look the answer up with their admission
            if gate:
                outcome = "hit" if admit(user, token=f"t{i}", now=None).cached else "full"
            else:
                services.admission_admit(
                    user_id=user.pk,
                    key_id=None,
                    model="local/demo",
                    request_id=uuid.uuid4().hex,
                    prompt_tokens=10,
                    max_tokens=20,
                )
                outcome = "full"
        except QuotaExceeded:
            outcome = "refused"
        finally:
            connection.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count("refused") == 20
    assert results.count("hit") + results.count("full") == 20
    assert results.count("hit") >= 1
