from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

from config.celery import app


def test_beat_schedule_names_only_registered_tasks():
    app.loader.import_default_modules()
    schedule = settings.CELERY_BEAT_SCHEDULE
    assert {
        "caching.popular_refresh",
        "quotas.tasks.usage_rollup",
        "quotas.tasks.budget_alerts_check",
        "quotas.tasks.quota_sweep",
    } <= {entry["task"] for entry in schedule.values()}
    for name, entry in schedule.items():
        assert entry["task"] in app.tasks, f"{name}: {entry['task']} is not a registered task"
        assert entry["schedule"] > 0


def test_tasks_are_acknowledged_late_and_jobs_have_their_own_queue():
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_url == settings.CELERY_BROKER_URL
    assert app.amqp.router.route({}, "generation.tasks.job_run")["queue"].name == "jobs"
    # Messages waiting for a quota window stay within Redis's redelivery timeout.
    timeout = app.conf.broker_transport_options["visibility_timeout"]
    assert timeout > settings.JOB_RETRY_MAX_COUNTDOWN


@pytest.mark.parametrize(
    ("broker", "backend"),
    [
        ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
        ("amqp://guest:guest@127.0.0.1:5672//", "rpc://"),
    ],
)
def test_result_backend_follows_the_broker(broker, backend):
    env = {**os.environ, "CELERY_BROKER_URL": broker}
    env.pop("CELERY_RESULT_BACKEND", None)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from config.celery import app; "
            "print(app.conf.broker_url, app.conf.result_backend)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
        cwd=settings.BASE_DIR,
    )
    assert out.stdout.split() == [broker, backend]
