"""A real Celery worker (in a thread of the test process) consuming the real Redis broker
named by CELERY_BROKER_URL. Tests using it need committed data (`transactional_db`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from django.conf import settings


@pytest.fixture
def celery_worker(transactional_db: Any) -> Iterator[Any]:
    from config.celery import app

    assert settings.CELERY_BROKER_URL.startswith("redis://"), "the worker tests need Redis"
    # The broker database is this suite's own: drop messages left by an earlier run.
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    app.conf.task_always_eager = False
    with start_worker(
        app,
        pool="solo",
        perform_ping_check=False,
        queues=["default", "jobs"],
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as worker:
        yield worker
