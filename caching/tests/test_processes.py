"""The tier across real processes sharing one Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings

from caching.services import (
    cache_get,
    cache_invalidate,
    cache_local_reset,
    cache_namespace_drop,
    cache_probe,
    cache_probe_found,
    cache_set,
    cache_store_later,
    single_flight,
)
from caching.tier import INVALIDATION_POLL_SECONDS, tier
from config.redis_calls import run_calls

pytestmark = pytest.mark.slow

ROOT = Path(settings.BASE_DIR)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    return subprocess.Popen(
        [sys.executable, "-m", "caching.tests.worker_proc", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(autouse=True)
def _redis(redis_conn):
    cache_local_reset()
    return redis_conn


def _layers_in_another_process_after(entries: dict[str, str], change: Callable[[], object]):
    """Store `entries`, have another process read them (into its memory layer), make
    `change` here, wait the contract's one second, and return the layer each key now comes
    from in the other process ("memory", "redis" or "none")."""
    for key, text in entries.items():
        cache_set(key, {"text": text})
    worker = _spawn("read", *entries)
    try:
        assert json.loads(worker.stdout.readline()) == ["memory"] * len(entries)
        change()
        time.sleep(1.0)  # the contract's bound
        worker.stdin.write("check\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())
    finally:
        worker.kill()
        worker.wait()


def test_pattern_invalidation_reaches_another_process_memory_within_one_second():
    entries = {"topic:python programming:subtopics:abc": "python", "topic:rust:subtopics:abc": "r"}

    layers = _layers_in_another_process_after(
        entries, lambda: cache_invalidate(pattern="topic:python*")
    )

    # The other process's memory no longer answers for python, still does for rust.
    assert layers == ["none", "memory"]


def test_namespace_drop_reaches_another_process_memory_within_one_second():
    entries = {"gen:a": "a", "topic:a:subtopics:x": "b"}

    layers = _layers_in_another_process_after(
        entries, lambda: cache_namespace_drop(namespace="gen")
    )

    assert layers == ["none", "memory"]


def test_broadcast_set_replaces_another_process_memory_copy_within_one_second():
    entries = {"gen:a": "old", "gen:b": "other"}

    layers = _layers_in_another_process_after(
        entries, lambda: cache_set("gen:a", {"text": "new"}, broadcast=True)
    )

    # Its memory copy was dropped: the new answer comes from Redis.
    assert layers == ["redis", "memory"]


def _purge_in_another_process_seen_here(pattern: str) -> int:
    """An operator's purge made by another process, then a look-up here late enough for
    this process to apply it (its poll); returns how many entries the purge dropped."""
    purge = subprocess.run(
        [sys.executable, "-m", "caching.tests.worker_proc", "invalidate", pattern],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        check=True,
    )
    time.sleep(INVALIDATION_POLL_SECONDS)
    cache_get("gen:unrelated")  # any look-up syncs
    return int(json.loads(purge.stdout))


def test_answer_stored_while_another_process_purges_it_stays_purged(redis_conn):
    key = "topic:python:subtopics:abc"
    # A miss's answer: its Redis write rides in the settlement's round trip...
    pending = cache_store_later(key, {"text": "computed before the purge"})
    run_calls(list(pending.calls))
    # ... and an operator purges it before this request puts it in its memory layer.
    assert _purge_in_another_process_seen_here("topic:python*") == 1
    pending.finish()

    time.sleep(1.0)  # the contract's bound

    assert cache_get(key) is None


def test_answer_read_while_another_process_purges_it_is_not_kept_in_memory(redis_conn):
    key = "topic:python:subtopics:abc"
    cache_set(key, {"text": "purged"})
    cache_local_reset()  # this process has it in Redis only
    # A look-up past the memory layer: the admission's script reads the entry...
    hit, probe = cache_probe(key, lock_seconds=30)
    assert hit is None
    raw = redis_conn.get(probe.entry_key)
    # ... and an operator purges it before this request promotes it into memory.
    assert _purge_in_another_process_seen_here("topic:python*") == 1
    hit, _ = cache_probe_found(probe, raw, locked=False)
    assert hit.value == {"text": "purged"}  # read before the purge: this request has it

    time.sleep(1.0)  # the contract's bound

    assert cache_get(key) is None


def test_single_flight_across_processes_computes_once(redis_conn):
    workers = [_spawn("flight", "gen:shared", "20") for _ in range(2)]
    results: list[str | None] = []
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"

        def compute() -> dict:
            redis_conn.incr("test:computes")
            time.sleep(0.3)
            return {"text": "shared answer"}

        def local_worker() -> None:
            results.append(single_flight("gen:shared", compute, wait_seconds=10)[1])

        threads = [threading.Thread(target=local_worker) for _ in range(10)]
        redis_conn.set("test:go", 1)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reports = [json.loads(worker.stdout.readline()) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()

    assert int(redis_conn.get("test:computes")) == 1
    assert [r["done"] for r in reports] == [20, 20]
    assert sum(r["computed_here"] for r in reports) + results.count(None) == 1
    # The others name the layer they took the answer from, as a cache hit does: in a
    # process that did not compute it, the first to get it read it from Redis.
    took = [set(r["layers"]) for r in reports] + [set(results) - {None}]
    computed = [r["computed_here"] for r in reports] + [results.count(None)]
    for layers, here in zip(took, computed, strict=True):
        assert layers <= {"memory", "redis"}
        assert here or "redis" in layers
    assert tier().redis.exists(tier().k("lock:gen:shared")) == 0


@pytest.mark.django_db
def test_warming_refresh_replaces_another_process_memory_copy_within_one_second(local_model):
    from caching.warming import cache_warm, topic_key
    from quotas.tests.factories import UserFactory

    operator = UserFactory(is_superuser=True)
    key = topic_key(topic="python")

    layers = _layers_in_another_process_after(
        {key: "old"}, lambda: cache_warm(topics=["python"], user_id=operator.pk, refresh=True)
    )

    # Its memory copy of the old answer was dropped: the new one comes from Redis.
    assert layers == ["redis"]
    assert cache_get(key).value["subtopics"]
