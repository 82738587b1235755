from __future__ import annotations

import threading
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from caching.services import (
    FlightLock,
    cache_delete,
    cache_get,
    cache_get_stale,
    cache_invalidate,
    cache_key_generation,
    cache_key_topic,
    cache_local_reset,
    cache_namespace_drop,
    cache_probe,
    cache_probe_found,
    cache_probe_stale,
    cache_set,
    cache_stats,
    cache_stats_reset,
    cache_store_later,
    popularity_bump,
    popularity_top,
    single_flight,
    topic_normalise,
)
from caching.tier import tier
from config.outages import redis_outage
from config.redis_calls import ScriptCall, run_calls

T0 = 1_900_000_000.0  # a fixed "now" for the TTL tests


@pytest.fixture(autouse=True)
def _redis(redis_conn):
    cache_local_reset()
    return redis_conn


def test_topic_normalise_ignores_case_and_whitespace():
    assert topic_normalise("  Python\t  PROGRAMMING \n") == "python programming"


def test_generation_key_same_for_same_request_and_different_otherwise():
    messages = [{"role": "user", "content": "hi"}]
    a = cache_key_generation(model="m", messages=messages, params={"t": 0.7, "max": 5})
    b = cache_key_generation(model="m", messages=list(messages), params={"max": 5, "t": 0.7})
    c = cache_key_generation(model="m", messages=messages, params={"t": 0.8, "max": 5})
    assert a == b
    assert a != c


def test_topic_key_groups_variants_of_a_topic():
    assert cache_key_topic(kind="subtopics", topic="Python  Programming", model="m") == (
        cache_key_topic(kind="subtopics", topic="python programming", model="m")
    )


def test_get_redis_hit_is_promoted_into_memory():
    cache_set("gen:a", {"text": "A"})
    cache_local_reset()  # a fresh worker: empty memory layer, the entry is only in Redis

    first = cache_get("gen:a")
    second = cache_get("gen:a")

    assert first is not None
    assert first.layer == "redis"
    assert first.value == {"text": "A"}
    assert second is not None
    assert second.layer == "memory"
    assert second.value == {"text": "A"}


def test_get_returns_a_copy_the_caller_may_mutate():
    cache_set("gen:a", {"text": "A"})
    hit = cache_get("gen:a")
    assert hit is not None
    hit.value["text"] = "changed"

    again = cache_get("gen:a")
    assert again is not None
    assert again.value == {"text": "A"}


def test_memory_layer_evicts_least_recently_used_at_size_bound(settings):
    settings.CACHE_MEMORY_MAX_SIZE = 3
    cache_local_reset()
    for name in ("gen:1", "gen:2", "gen:3"):
        cache_set(name, {"n": name})
    assert cache_get("gen:1").layer == "memory"  # gen:1 is now the most recently used

    cache_set("gen:4", {"n": "gen:4"})

    assert tier().memory.keys() == ["gen:3", "gen:1", "gen:4"]
    evicted = cache_get("gen:2")
    assert evicted is not None
    assert evicted.layer == "redis"  # still in the shared layer
    assert len(tier().memory) == 3


def test_memory_entry_expires_after_memory_ttl_then_comes_from_redis(settings):
    settings.CACHE_MEMORY_TTL = 10
    cache_set("gen:a", {"text": "A"}, ttl=100, now=T0)

    assert cache_get("gen:a", now=T0 + 9).layer == "memory"
    later = cache_get("gen:a", now=T0 + 11)

    assert later is not None
    assert later.layer == "redis"


def test_entry_expires_in_both_layers_after_fresh_ttl(settings):
    settings.CACHE_MEMORY_TTL = 600
    cache_set("gen:a", {"text": "A"}, ttl=100, now=T0)

    assert cache_get("gen:a", now=T0 + 99) is not None
    assert cache_get("gen:a", now=T0 + 101) is None  # memory bounded by the fresh TTL too
    cache_local_reset()
    assert cache_get("gen:a", now=T0 + 101) is None  # and Redis treats it as a miss


def test_redis_keeps_entry_for_fresh_plus_fallback_ttl(settings, redis_conn):
    settings.QUOTA_FALLBACK_CACHE_TTL = 50
    cache_set("gen:a", {"text": "A"}, ttl=100)

    pttl = redis_conn.pttl(tier().entry_key("gen:a"))

    assert 149_000 < pttl <= 150_000


def test_stale_copy_served_only_through_cache_get_stale(settings):
    settings.QUOTA_FALLBACK_CACHE_TTL = 50
    cache_set("gen:a", {"text": "A"}, ttl=100, now=T0)

    assert cache_get("gen:a", now=T0 + 120) is None
    stale = cache_get_stale("gen:a", now=T0 + 120)
    assert stale is not None
    assert stale.stale is True
    assert stale.value == {"text": "A"}
    assert cache_get("gen:a", now=T0 + 120) is None  # serving it stale did not revive it
    assert cache_get_stale("gen:a", now=T0 + 151) is None


def test_delete_by_key_drops_both_layers_and_stale_copy():
    cache_set("gen:a", {"text": "A"})
    cache_set("gen:b", {"text": "B"})

    assert cache_delete(keys=["gen:a"]) == 1

    assert cache_get("gen:a") is None
    assert cache_get_stale("gen:a") is None
    assert cache_get("gen:b") is not None


def test_invalidate_pattern_drops_matching_keys_only_and_counts_them():
    python_keys = [
        cache_key_topic(kind="subtopics", topic="Python", model="m"),
        cache_key_topic(kind="subtopics", topic="python programming", model="m"),
        cache_key_topic(kind="explanations", topic="Python", model="m"),
    ]
    other = cache_key_topic(kind="subtopics", topic="Rust", model="m")
    for key in [*python_keys, other]:
        cache_set(key, {"k": key})

    assert cache_invalidate(pattern="topic:python*") == 3

    assert all(cache_get(key) is None for key in python_keys)
    assert all(cache_get_stale(key) is None for key in python_keys)
    assert cache_get(other).layer == "memory"


def test_invalidate_pattern_without_literal_namespace_scans_every_namespace():
    cache_set("gen:abc", {"x": 1})
    cache_set("topic:abc:subtopics:1", {"x": 2})
    cache_set("topic:xyz:subtopics:1", {"x": 3})

    assert cache_invalidate(pattern="*abc*") == 2

    assert cache_get("gen:abc") is None
    assert cache_get("topic:abc:subtopics:1") is None
    assert cache_get("topic:xyz:subtopics:1") is not None


def test_invalidate_pattern_ignores_case_past_ascii_and_without_a_namespace():
    cafe = cache_key_topic(kind="subtopics", topic="Café au lait", model="m")
    tea = cache_key_topic(kind="subtopics", topic="Tea", model="m")
    cache_set(cafe, {"x": 1})
    cache_set(tea, {"x": 2})
    cache_set("gen:abc", {"x": 3})

    assert cache_invalidate(pattern="topic:CAFÉ AU*") == 1
    assert cache_invalidate(pattern="*:TEA:*") == 1
    assert cache_invalidate(pattern="GEN:ABC") == 1

    assert [cache_get(key) for key in (cafe, tea, "gen:abc")] == [None, None, None]


def test_invalidate_pattern_scans_past_one_batch():
    for i in range(1200):
        cache_set(f"topic:bulk{i}:subtopics:x", {"i": i})

    assert cache_invalidate(pattern="topic:bulk*") == 1200


def test_namespace_drop_hides_every_entry_of_that_namespace_only(redis_conn):
    cache_set("gen:a", {"x": 1})
    cache_set("topic:a:subtopics:1", {"x": 2})
    keys_before = redis_conn.dbsize()

    cache_namespace_drop(namespace="gen")

    assert cache_get("gen:a") is None
    assert cache_get_stale("gen:a") is None
    assert cache_get("topic:a:subtopics:1") is not None
    cache_set("gen:a", {"x": 3})
    assert cache_get("gen:a").value == {"x": 3}
    assert redis_conn.dbsize() >= keys_before  # O(1): nothing was scanned or deleted


def test_key_without_namespace_is_refused():
    with pytest.raises(ValueError, match="namespace"):
        cache_set("plain", {"x": 1})


def test_single_flight_50_threads_compute_once():
    calls = 0
    calls_lock = threading.Lock()
    barrier = threading.Barrier(50)
    results: list[tuple[dict, bool]] = []

    def compute() -> dict:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.2)
        return {"text": "answer"}

    def worker() -> None:
        barrier.wait()
        results.append(single_flight("gen:same", compute, wait_seconds=10))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert calls == 1
    assert len(results) == 50
    assert all(value == {"text": "answer"} for value, _ in results)
    assert sorted(layer or "computed" for _, layer in results) == ["computed"] + ["memory"] * 49
    assert cache_get("gen:same").value == {"text": "answer"}


def test_single_flight_hit_after_store_does_not_compute():
    cache_set("gen:same", {"text": "cached"})
    cache_local_reset()

    value, layer = single_flight("gen:same", lambda: {"text": "new"})

    assert value == {"text": "cached"}
    assert layer == "redis"


def test_single_flight_waiter_proceeds_alone_after_bounded_wait(redis_conn):
    # Another process holds the lock and never answers.
    redis_conn.set(tier().k("lock:gen:stuck"), "someone-else", px=60_000)

    value, layer = single_flight("gen:stuck", lambda: {"text": "mine"}, wait_seconds=0.3)

    assert value == {"text": "mine"}
    assert layer is None


def test_single_flight_leader_failure_reaches_waiters_and_releases_lock(redis_conn):
    barrier = threading.Barrier(5)
    errors: list[BaseException] = []
    calls = 0

    def compute() -> dict:
        nonlocal calls
        calls += 1
        time.sleep(0.2)
        raise RuntimeError("upstream down")

    def worker() -> None:
        barrier.wait()
        try:
            single_flight("gen:fail", compute, wait_seconds=10)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert calls == 1
    assert len(errors) == 5
    assert {str(exc) for exc in errors} == {"upstream down"}
    assert len({id(exc) for exc in errors}) == 5  # each request may annotate its own
    assert redis_conn.exists(tier().k("lock:gen:fail")) == 0
    assert cache_get("gen:fail") is None


def test_stats_count_what_was_done():
    cache_stats_reset()
    cache_set("gen:a", {"x": 1})
    cache_set("gen:b", {"x": 2})
    cache_get("gen:a")  # memory hit
    cache_get("gen:a")  # memory hit
    cache_get("gen:missing")  # memory miss, redis miss
    tier().memory.clear()
    cache_get("gen:b")  # memory miss, redis hit
    cache_get_stale("gen:nothing")  # stale miss
    for _ in range(3):
        popularity_bump("Python  Programming")
    popularity_bump("rust")

    stats = cache_stats()

    assert stats["memory"] == {"size": 1, "max_size": 1000, "hits": 2, "misses": 2}
    assert stats["redis"] == {"hits": 1, "misses": 1, "hit_rate": 0.5}
    assert stats["stale"] == {"hits": 0, "misses": 1}
    assert stats["sets"] == 2
    assert stats["popular"] == [["python programming", 3], ["rust", 1]]


def test_popularity_top_filters_by_min_count():
    popularity_bump("a", count=12)
    popularity_bump("b", count=3)

    assert popularity_top(min_count=10) == [("a", 12)]


def test_popularity_is_summed_across_workers():
    popularity_bump("python", count=2)
    cache_local_reset()  # another worker (the buffered count was flushed on reset)
    popularity_bump("python", count=5)

    assert popularity_top() == [("python", 7)]


def test_redis_outage_is_a_miss_not_an_error():
    import redis

    cache_set("gen:a", {"x": 1})
    cache_local_reset()
    t = tier()
    t.redis  # noqa: B018 - loads the scripts on the real client first
    # A Redis that does not answer (nothing listens on port 1).
    t._redis = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    t.outage = redis_outage(t._redis)

    assert cache_get("gen:a") is None
    cache_set("gen:b", {"x": 2})  # dropped from Redis, kept in this worker's memory
    assert cache_get("gen:b").layer == "memory"


def take_lock(redis_conn, key: str) -> FlightLock | None:
    """What a miss's admission script does with the probe (quotas' CacheGate): SET the
    lock NX for its time; the lock if it was free."""
    hit, probe = cache_probe(key, lock_seconds=30)
    assert hit is None
    assert probe is not None
    taken = bool(redis_conn.set(probe.lock.key, probe.lock.token, nx=True, px=probe.lock_ms))
    return cache_probe_found(probe, None, locked=taken)[1]


def test_probe_answers_from_memory_or_leaves_the_redis_look_up_to_another_script(redis_conn):
    cache_set("gen:probe", {"text": "here"})
    hit, probe = cache_probe("gen:probe", lock_seconds=30)
    assert (hit.value, hit.layer, probe) == ({"text": "here"}, "memory", None)

    cache_local_reset()  # another worker: in Redis only
    hit, probe = cache_probe("gen:probe", lock_seconds=30)
    assert hit is None
    assert probe.entry_key == tier().entry_key("gen:probe")
    assert probe.lock_ms == 30_000
    assert redis_conn.exists(probe.lock.key) == 0  # nothing taken yet

    raw = redis_conn.get(probe.entry_key)  # what the admission script reads
    hit, lock = cache_probe_found(probe, raw, locked=False)
    assert (hit.value, hit.layer, lock) == ({"text": "here"}, "redis", None)
    assert cache_get("gen:probe").layer == "memory"  # promoted
    assert cache_probe_stale(probe, raw).value == {"text": "here"}
    assert cache_probe_stale(probe, None) is None


def test_probe_without_redis_is_a_plain_miss(redis_conn):
    t = tier()
    t.failed(RedisConnectionError("refused"), "a look-up")  # its server is away

    assert cache_probe("gen:down", lock_seconds=30) == (None, None)


def test_lookup_lock_is_released_by_single_flight_once_the_answer_is_stored(redis_conn):
    lock = take_lock(redis_conn, "gen:lookup-lead")
    calls = []

    value, here = single_flight(
        "gen:lookup-lead", lambda: calls.append(1) or {"text": "led"}, lock=lock
    )

    assert (value, here, calls) == ({"text": "led"}, None, [1])
    assert redis_conn.exists(lock.key) == 0
    cache_local_reset()
    assert cache_get("gen:lookup-lead").value == {"text": "led"}  # stored in Redis


def test_lookup_lock_is_released_when_the_computation_fails(redis_conn):
    lock = take_lock(redis_conn, "gen:lookup-fail")

    def boom() -> dict:
        raise RuntimeError("upstream")

    with pytest.raises(RuntimeError):
        single_flight("gen:lookup-fail", boom, lock=lock)

    assert redis_conn.exists(lock.key) == 0


def test_thread_holding_the_lookup_lock_leads_even_if_another_thread_waits_first(redis_conn):
    # B misses after A took the lock, and reaches single_flight first: B waits for A's
    # answer (polling Redis), A computes at once; neither waits out the lock.
    lock = take_lock(redis_conn, "gen:lookup-race")
    assert lock is not None
    results: list[tuple[dict, str | None]] = []
    b_waiting = threading.Event()

    def b() -> None:
        b_waiting.set()
        results.append(single_flight("gen:lookup-race", lambda: {"text": "B"}, wait_seconds=30))

    thread = threading.Thread(target=b)
    thread.start()
    b_waiting.wait()
    time.sleep(0.05)
    started = time.monotonic()
    assert single_flight("gen:lookup-race", lambda: {"text": "A"}, lock=lock) == (
        {"text": "A"},
        None,
    )
    thread.join(timeout=10)

    # B read A's answer once stored: from Redis, or from memory if A had put it there first.
    [(value, layer)] = results
    assert value == {"text": "A"}
    assert layer in ("memory", "redis")
    assert time.monotonic() - started < 5


def test_kept_lookup_lock_is_released_by_the_deferred_store_in_another_round_trip(redis_conn):
    # A miss's leader keeps its lock past the computation; the store that releases it is a
    # call sent in someone else's round trip (the settlement's), then finished here.
    lock = take_lock(redis_conn, "gen:later")
    value, here = single_flight("gen:later", lambda: {"text": "later"}, lock=lock, keep_lock=True)
    assert (value, here) == ({"text": "later"}, None)
    assert redis_conn.get(lock.key).decode() == lock.token  # still ours
    assert take_lock(redis_conn, "gen:later") is None  # others wait

    pending = cache_store_later("gen:later", value, lock=lock)
    other = ScriptCall(redis_conn.register_script("return 7"), keys=[], args=[])
    run_calls([other, *pending.calls])
    pending.finish()

    assert other.reply == 7
    assert redis_conn.exists(lock.key) == 0
    assert cache_get("gen:later").layer == "memory"
    cache_local_reset()
    assert cache_get("gen:later").value == {"text": "later"}  # in Redis for every worker


def test_deferred_store_whose_call_never_went_out_is_sent_by_finish(redis_conn):
    lock = take_lock(redis_conn, "gen:unsent")

    cache_store_later("gen:unsent", {"text": "mine"}, lock=lock).finish()

    assert redis_conn.exists(lock.key) == 0
    cache_local_reset()
    assert cache_get("gen:unsent").value == {"text": "mine"}


def test_deferred_store_without_a_lock_leaves_anothers_lock_alone(redis_conn):
    theirs = take_lock(redis_conn, "gen:theirs")

    cache_store_later("gen:theirs", {"text": "mine"}).finish()

    assert redis_conn.get(theirs.key).decode() == theirs.token
    cache_local_reset()
    assert cache_get("gen:theirs").value == {"text": "mine"}
