"""The Celery application; tasks are discovered in each app's tasks.py.

Configuration comes from the CELERY_* settings (config/settings.py): broker and result
backend from CELERY_BROKER_URL (Redis by default, RabbitMQ works too), late
acknowledgement, one message prefetched per process, the beat schedule.

    celery -A config worker -Q default,jobs --loglevel=INFO
    celery -A config beat --loglevel=INFO
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("tollgate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
