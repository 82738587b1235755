from __future__ import annotations

from typing import Any

from django.apps import AppConfig

from health.metrics import REQUESTS_IN_FLIGHT


class HealthConfig(AppConfig):
    name = "health"

    def ready(self) -> None:
        from celery.signals import task_postrun, task_prerun
        from django.core.signals import request_finished, request_started

        from config.db import deadline

        task_prerun.connect(_bind_task, weak=False, dispatch_uid="tollgate-log-task-bind")
        task_postrun.connect(_unbind_task, weak=False, dispatch_uid="tollgate-log-task-unbind")
        # A request's queries get DATABASE_READ_TIMEOUT; connected here rather than where
        # the database engine is loaded (its first connection), which may come after the
        # first request has started.
        request_started.connect(
            deadline.request_started, weak=False, dispatch_uid="tollgate-db-deadline-start"
        )
        request_finished.connect(
            deadline.request_finished, weak=False, dispatch_uid="tollgate-db-deadline-end"
        )
        # Django sends request_finished when the server closes the response: after the
        # last event of a stream, or once a client that left is noticed.
        request_started.connect(_request_in, weak=False, dispatch_uid="tollgate-in-flight-in")
        request_finished.connect(_request_out, weak=False, dispatch_uid="tollgate-in-flight-out")


def _request_in(**_: Any) -> None:
    REQUESTS_IN_FLIGHT.inc()


def _request_out(**_: Any) -> None:
    REQUESTS_IN_FLIGHT.dec()


def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Every log line a Celery task writes carries its id and name."""
    import structlog

    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


def _unbind_task(**_: Any) -> None:
    import structlog

    structlog.contextvars.unbind_contextvars("task_id", "task")
