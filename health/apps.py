from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class HealthConfig(AppConfig):
    name = "health"

    def ready(self) -> None:
        from celery.signals import task_postrun, task_prerun

        task_prerun.connect(_bind_task, weak=False, dispatch_uid="tollgate-log-task-bind")
        task_postrun.connect(_unbind_task, weak=False, dispatch_uid="tollgate-log-task-unbind")


def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Every log line a Celery task writes carries its id and name."""
    import structlog

    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


def _unbind_task(**_: Any) -> None:
    import structlog

    structlog.contextvars.unbind_contextvars("task_id", "task")
