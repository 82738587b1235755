"""The tier across real processes sharing one Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings

from caching.services import cache_invalidate, cache_local_reset, cache_set, single_flight
from caching.tier import tier

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


def test_pattern_invalidation_reaches_another_process_memory_within_one_second():
    python_key = "topic:python programming:subtopics:abc"
    rust_key = "topic:rust:subtopics:abc"
    cache_set(python_key, {"text": "python"})
    cache_set(rust_key, {"text": "rust"})
    worker = _spawn("read", python_key, rust_key)
    try:
        assert json.loads(worker.stdout.readline()) == ["memory", "memory"]

        assert cache_invalidate(pattern="topic:python*") == 1
        time.sleep(1.0)  # the contract's bound
        worker.stdin.write("check\n")
        worker.stdin.flush()

        # The other process's memory no longer answers for python, still does for rust.
        assert json.loads(worker.stdout.readline()) == ["none", "memory"]
    finally:
        worker.kill()
        worker.wait()


def test_namespace_drop_reaches_another_process_memory_within_one_second():
    from caching.services import cache_namespace_drop

    cache_set("gen:a", {"text": "a"})
    cache_set("topic:a:subtopics:x", {"text": "b"})
    worker = _spawn("read", "gen:a", "topic:a:subtopics:x")
    try:
        assert json.loads(worker.stdout.readline()) == ["memory", "memory"]

        cache_namespace_drop(namespace="gen")
        time.sleep(1.0)
        worker.stdin.write("check\n")
        worker.stdin.flush()

        assert json.loads(worker.stdout.readline()) == ["none", "memory"]
    finally:
        worker.kill()
        worker.wait()


def test_broadcast_set_replaces_another_process_memory_copy_within_one_second():
    cache_set("gen:a", {"text": "old"})
    cache_set("gen:b", {"text": "other"})
    worker = _spawn("read", "gen:a", "gen:b")
    try:
        assert json.loads(worker.stdout.readline()) == ["memory", "memory"]

        cache_set("gen:a", {"text": "new"}, broadcast=True)
        time.sleep(1.0)
        worker.stdin.write("check\n")
        worker.stdin.flush()

        # Its memory copy was dropped: the new answer comes from Redis.
        assert json.loads(worker.stdout.readline()) == ["redis", "memory"]
    finally:
        worker.kill()
        worker.wait()


def test_single_flight_across_processes_computes_once(redis_conn):
    workers = [_spawn("flight", "gen:shared", "20") for _ in range(2)]
    results: list[bool] = []
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
    assert sum(r["computed_here"] for r in reports) + sum(results) == 1
    assert tier().redis.exists(tier().k("lock:gen:shared")) == 0
