from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from quotas import services
from quotas.models import Plan, UserQuota

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """A separate Django process on the test database and Redis (see procs.py)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quotas.tests.procs"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask_raw() == {"ready": True}

    def ask_raw(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "worker process died"
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.ask_raw()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "exit"}\n')
            self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def worker_factory(transactional_db, redis_conn):
    """Start worker processes that share this test's database and Redis."""
    db = connection.settings_dict
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{host}:{port}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": "test-only-secret-key-not-for-production",
        "USAGE_HIT_BATCH_SECONDS": "0",
        "LEDGER_SPOOL_DIR": settings.LEDGER_SPOOL_DIR,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("TEST_DATABASE_NAME", None)
    workers: list[Worker] = []

    def start(**extra_env: str) -> Worker:
        worker = Worker({**env, **extra_env})
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


@pytest.fixture
def plan_for(local_model):
    """Put a user on a fresh plan with the given limits; returns the plan."""

    def make(user, **limits: Any) -> Plan:
        plan = Plan.objects.create(name=f"plan-{user.pk}-{Plan.objects.count()}", **limits)
        UserQuota.objects.update_or_create(user=user, defaults={"plan": plan})
        return plan

    return make


@pytest.fixture(params=["redis", "local"])
def engine(request, settings, redis_conn):
    """Both backends: Redis, and the in-process one of the embedded default, which must
    have the same semantics for one process."""
    if request.param == "local":
        settings.REDIS_URL = ""
    services.local_state_reset()
    yield request.param
    services.local_state_reset()


@pytest.fixture
def save(django_capture_on_commit_callbacks):
    """Save a governance row and run its on-commit hooks (the live policy bump)."""

    def run(obj):
        with django_capture_on_commit_callbacks(execute=True):
            obj.save()

    return run


@pytest.fixture
def free_model(db):
    """A local model that costs nothing: its requests add nothing to a cost budget."""
    from quotas.models import ModelPrice

    ModelPrice.objects.create(
        model="local/free",
        provider="local",
        upstream_model="free",
        input_per_million=0,
        output_per_million=0,
    )
    return "local/free"
