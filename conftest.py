"""Shared fixtures. The suite runs against the real PostgreSQL and Redis named by
DATABASE_URL and REDIS_URL (defaults in pyproject.toml); if either is unreachable the run
stops at once with a clear message instead of skipping."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest
from django.conf import settings


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    db = settings.DATABASES["default"]
    missing = []
    if db["ENGINE"] != "config.db":  # PostgreSQL through config/db/base.py
        missing.append("DATABASE_URL must point at PostgreSQL for the test suite")
    elif not _reachable(
        f"postgres://{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}", 5432
    ):
        missing.append(f"PostgreSQL is unreachable at {db.get('HOST')}:{db.get('PORT')}")
    if not settings.REDIS_URL:
        missing.append("REDIS_URL must be set for the test suite")
    elif not _reachable(settings.REDIS_URL, 6379):
        missing.append(f"Redis is unreachable at {settings.REDIS_URL}")
    if missing:
        pytest.exit("cannot run the suite: " + "; ".join(missing), returncode=3)


@pytest.fixture
def redis_conn():
    """The raw Redis connection of the default cache, flushed before and after the test."""
    from django_redis import get_redis_connection

    conn = get_redis_connection("default")
    conn.flushdb()
    yield conn
    conn.flushdb()


class RedisRoundTrips:
    """Counts what redis-py writes to its sockets: a command, a pipeline or a script call is
    one write and one round trip."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import redis.connection

        self.count = 0
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(conn, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.count += 1
            return original(conn, *args, **kwargs)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)


@pytest.fixture
def redis_round_trips(monkeypatch):
    """A RedisRoundTrips counter for this test (`.count`, set it back to 0 at will)."""
    return RedisRoundTrips(monkeypatch)


@pytest.fixture(autouse=True)
def _clean_process_state(tmp_path):
    """Each test starts with empty in-process caches (policies, keys, memory cache), a
    ledger spool of its own and no outage (nor hung database) remembered."""
    from caching.services import cache_local_reset
    from config.db.deadline import holds_reset
    from config.outages import outages_reset
    from health.gauges import gauges_trouble_reset
    from quotas.authentication import key_cache_clear
    from quotas.services import local_state_reset
    from quotas.services.spool import spool_forget

    key_cache_clear()
    local_state_reset()
    cache_local_reset()
    spool_forget()
    outages_reset()
    holds_reset()
    gauges_trouble_reset()
    settings.LEDGER_SPOOL_DIR = str(tmp_path / "ledger-spool")


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def user(db):
    from quotas.tests.factories import UserFactory

    return UserFactory()


@pytest.fixture
def local_model(db):
    """The offline model at 1.50 / 2.00 USD per million input / output tokens."""
    from quotas.tests.factories import ModelPriceFactory

    return ModelPriceFactory(context_window=8192, max_output_tokens=1024)


@pytest.fixture
def api_key(user):
    """(full key string, ApiKey) for `user`."""
    from quotas.services import key_create

    return key_create(user=user, name="test")


@pytest.fixture
def hidden_ledger():
    """A context in which the ledger table is out of reach (renamed): every write to it
    fails as it would with the database refusing it. Needs a transactional test."""
    from django.db import connection

    from quotas.models import UsageRecord

    table = UsageRecord._meta.db_table

    def rename(old: str, new: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')

    class Hidden:
        def __enter__(self) -> None:
            rename(table, "ledger_out_of_reach")

        def __exit__(self, *exc: object) -> None:
            rename("ledger_out_of_reach", table)

    return Hidden()
