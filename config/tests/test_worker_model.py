"""The web worker model of gunicorn.conf.py against a slow model provider: one gunicorn
worker process, started by the test with the configuration's default worker class, and a
loopback fake upstream that takes longer to answer than gunicorn's worker timeout."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from django.conf import settings

from config.tests.test_serving import (
    children,
    free_port,
    gpt_test_model,
    http,
    live,
    start_web,
    stop,
    wait_for,
    web_env,
)
from generation.tests.fake_upstream import Behaviour, FakeUpstream
from quotas.models import UsageRecord
from quotas.services import key_create
from quotas.tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOW = 3.0  # seconds the upstream takes: more than the worker timeout below
CALLS = 4  # the configuration's default threads per worker


def test_one_worker_holds_slow_upstream_calls_at_once_past_the_worker_timeout(tmp_path):
    gpt_test_model()
    key, _ = key_create(user=UserFactory(), name="slow")
    upstream = FakeUpstream().start()
    upstream.default = Behaviour(kind="slow", delay=SLOW, text="late", usage=(10, 5))
    port = free_port()
    env = web_env(
        port=port,
        upstream=upstream,
        prometheus_dir=tmp_path / "prometheus",
        UPSTREAM_READ_TIMEOUT="10",
        WEB_CONCURRENCY="1",
        GUNICORN_TIMEOUT="2",
    )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    log = tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    web = start_web(env, log)
    try:
        wait_for(lambda: live(base), 60, "gunicorn answering /health/live", [log])
        (worker,) = children(web.pid)
        results: list[int] = []

        def ask(i: int) -> None:
            status, _, _ = http("POST", f"{base}/api/v1/generate", _body(i), key)
            results.append(status)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(CALLS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - started

        assert results == [200] * CALLS, log.read_text()[-3000:]
        # At once, not one after the other (that would take CALLS x SLOW seconds) ...
        assert elapsed < 2 * SLOW
        # ... and the worker, busy past its 2 s timeout, was not killed for it.
        assert children(web.pid) == [worker]
        assert "WORKER TIMEOUT" not in log.read_text()
        assert UsageRecord.objects.filter(outcome="ok").count() == CALLS
    finally:
        stop(web)
        upstream.close()


def _body(i: int) -> dict:
    return {"prompt": f"slow question {i}", "model": "gpt-test"}
