"""A task for the tests that run a real Celery worker process (`celery worker -I
quotas.tests.celery_tasks`): it queues one cache-hit ledger row, as a batch job's cache hit
does, and returns the pid of the pool process that ran it."""

from __future__ import annotations

import os

from config.celery import app


@app.task(name="tests.ledger_hit_queued", ignore_result=False)
def ledger_hit_queued(user_id: int, request_id: str) -> int:
    from quotas.services import ledger

    ledger._keep(
        ledger._row(
            request_id=request_id,
            user_id=user_id,
            model="local/demo",
            provider="local",
            cached=True,
            outcome="cached",
        )
    )
    return os.getpid()
