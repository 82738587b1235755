"""The Celery application; tasks are discovered in each app's tasks.py.

Configuration comes from the CELERY_* settings (config/settings.py): broker and result
backend from CELERY_BROKER_URL (Redis by default, RabbitMQ works too), late
acknowledgement, one message prefetched per process, the beat schedule.

    celery -A config worker -Q default,jobs --loglevel=INFO
    celery -A config beat --loglevel=INFO
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("tollgate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_shutdown.connect
def _ledger_flush_at_exit(**_: Any) -> None:
    """A prefork pool process leaves with os._exit, so the atexit hook that writes its
    queued cache-hit ledger rows (a batch job's cache hits) never runs: run it here."""
    from quotas.services.ledger import usage_flush_at_exit

    usage_flush_at_exit()
