"""The batched cache-hit ledger rows when the database refuses them (real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import ProgrammingError, connection

from quotas.models import UsageRecord
from quotas.services import ledger, usage_flush

pytestmark = pytest.mark.django_db(transaction=True)


def _queue_hit_rows(
    user, count: int, *, user_id: int | None = None, prefix: str = "hit"
) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    for request_id in ids:
        ledger._hit_queue.put(
            ledger._row(
                request_id=request_id,
                user_id=user.pk if user_id is None else user_id,
                model="local/demo",
                provider="local",
                cached=True,
                outcome="cached",
            )
        )
    return ids


def test_hit_rows_the_database_refused_are_written_by_the_next_flush(user, hidden_ledger):
    ids = _queue_hit_rows(user, 3)

    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()

    assert UsageRecord.objects.count() == 0
    assert usage_flush() == 3
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == set(ids)


def test_hit_rows_past_the_backlog_bound_are_dropped_oldest_first(
    user, hidden_ledger, monkeypatch, settings, tmp_path
):
    # The bound holds in memory, where rows stay when the spool cannot be written.
    (tmp_path / "a-file").write_text("")
    settings.LEDGER_SPOOL_DIR = str(tmp_path / "a-file")
    monkeypatch.setattr(ledger, "HIT_BACKLOG_MAX", 2)
    _queue_hit_rows(user, 5)

    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()

    assert usage_flush() == 2
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == {"hit-3", "hit-4"}


def test_a_row_the_database_refuses_for_good_is_dropped_and_the_rest_written(user, caplog):
    # Its user was deleted between the request and the flush: the foreign key refuses it
    # now and always. It must not hold back the rows queued with it.
    good = _queue_hit_rows(user, 3)
    _queue_hit_rows(user, 1, user_id=user.pk + 10_000, prefix="orphan")

    assert usage_flush() == 3

    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == set(good)
    assert ledger._hit_queue.empty()
    assert "ledger row dropped" in caplog.text


def test_hit_rows_queued_in_a_celery_pool_process_are_written_when_the_worker_stops(user, tmp_path):
    """A prefork pool process leaves with os._exit: no atexit hook runs in it. Its queued
    cache-hit rows (a batch job's cache hits) must still be written when it stops (a warm
    shutdown at each deploy, --max-tasks-per-child)."""
    import redis

    from config.celery import app

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}",
        "SECRET_KEY": "test-only-secret-key-not-for-production",
        "USAGE_HIT_BATCH_SECONDS": "600",  # the flusher thread does not write it first
        "LEDGER_SPOOL_DIR": settings.LEDGER_SPOOL_DIR,
    }
    env.pop("TEST_DATABASE_NAME", None)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [
            sys.executable,
            *("-m", "celery", "-A", "config", "worker", "-P", "prefork", "-c", "1"),
            *("-Q", "default", "-I", "quotas.tests.celery_tasks", "-l", "WARNING"),
            *("--without-mingle", "--without-gossip", "--without-heartbeat"),
        ],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        pid = app.send_task("tests.ledger_hit_queued", args=[user.pk, "hit-in-pool"]).get(
            timeout=60
        )
    finally:
        worker.send_signal(signal.SIGTERM)  # a warm shutdown
        worker.wait(60)
        log.close()

    assert pid != worker.pid, (tmp_path / "worker.log").read_text()  # run in a pool process
    assert UsageRecord.objects.filter(request_id="hit-in-pool").count() == 1
