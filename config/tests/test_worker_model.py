"""The web worker model of gunicorn.conf.py against a slow model provider: one gunicorn
worker process, started by the test with the configuration's default worker class, and a
loopback fake upstream that takes longer to answer than gunicorn's worker timeout."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from django.conf import settings

from config.tests.test_serving import BIN, ROOT, children, free_port, http, stop, wait_for
from generation.tests.fake_upstream import Behaviour, FakeUpstream
from quotas.models import ModelPrice, UsageRecord
from quotas.services import key_create
from quotas.tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOW = 3.0  # seconds the upstream takes: more than the worker timeout below
CALLS = 4  # the configuration's default threads per worker


def test_one_worker_holds_slow_upstream_calls_at_once_past_the_worker_timeout(tmp_path):
    import subprocess

    ModelPrice.objects.create(
        model="gpt-test",
        provider="openai",
        upstream_model="gpt-4o-mini",
        input_per_million="0.150000",
        output_per_million="0.600000",
    )
    key, _ = key_create(user=UserFactory(), name="slow")
    upstream = FakeUpstream().start()
    upstream.default = Behaviour(kind="slow", delay=SLOW, text="late", usage=(10, 5))
    db = settings.DATABASES["default"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "GUNICORN_"))}
    env.update(
        DATABASE_URL=f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}",
        REDIS_URL=settings.REDIS_URL,
        OPENAI_BASE_URL=upstream.openai_base_url,
        OPENAI_API_KEY="sk-test",
        UPSTREAM_READ_TIMEOUT="10",
        WEB_CONCURRENCY="1",
        GUNICORN_TIMEOUT="2",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        SECURE_SSL_REDIRECT="0",
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    log = tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        web = subprocess.Popen(
            [str(BIN / "gunicorn"), "config.wsgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _live(base), 60, "gunicorn answering /health/live", [log])
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


def _live(base: str) -> bool:
    try:
        return http("GET", f"{base}/health/live")[0] == 200
    except OSError:
        return False
