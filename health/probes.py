"""Liveness, readiness and startup checks.

Each readiness check talks to its dependency once with a short timeout
(HEALTH_CHECK_TIMEOUT seconds) and reports `{"status": "ok"|"fail", "latency_ms"}`.
Which checks are required is HEALTH_REQUIRED_CHECKS: a failing required check makes the
service `fail` (HTTP 503, taken out of the load balancer), a failing optional one makes it
`degraded` (HTTP 200: it still serves, e.g. quotas fail open without Redis).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from config.db.deadline import read_deadline

CHECKS = ("database", "redis", "broker")


@dataclass(frozen=True, slots=True)
class CheckResult:
    status: str  # ok | fail | skipped
    latency_ms: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "latency_ms": self.latency_ms}
        if self.error:
            body["error"] = self.error
        return body


def _timed(check: Callable[[float], str]) -> Callable[[float], CheckResult]:
    def run(timeout: float) -> CheckResult:
        started = time.perf_counter()
        error: str | None = None
        try:
            status = check(timeout)
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency is a failed check
            error = type(exc).__name__
            status = "fail"
        latency = round((time.perf_counter() - started) * 1000, 2)
        return CheckResult(status=status, latency_ms=latency, error=error)

    return run


@_timed
def check_database(timeout: float) -> str:
    """SELECT 1 on the default database, bounded by a statement timeout on PostgreSQL and,
    should the server not answer at all, by a read deadline half a second later (so that a
    server that runs answers with its own error first; config/db/deadline.py)."""
    connection = connections[DEFAULT_DB_ALIAS]
    with (
        read_deadline(timeout + 0.5),
        transaction.atomic(using=DEFAULT_DB_ALIAS),
        connection.cursor() as cursor,
    ):
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL statement_timeout = %s", [max(1, int(timeout * 1000))])
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


_clients: dict[tuple[str, float], redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis_client(url: str, timeout: float) -> redis.Redis:
    """One small client per (url, timeout), reused between probes."""
    key = (url, timeout)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=timeout,
                    socket_timeout=timeout,
                    max_connections=4,
                    retry_on_timeout=False,
                )
                _clients[key] = client
    return client


def _ping_redis(url: str, timeout: float) -> str:
    if not _redis_client(url, timeout).ping():
        raise ConnectionError("no PONG")
    return "ok"


@_timed
def check_redis(timeout: float) -> str:
    """PING the Redis that holds the cache, counters and breaker state."""
    url = settings.REDIS_URL
    if not url:
        return "skipped"  # embedded default: in-process cache and quotas
    return _ping_redis(url, timeout)


@_timed
def check_broker(timeout: float) -> str:
    """Reach the Celery broker: PING for Redis, an AMQP connection for RabbitMQ."""
    url = settings.CELERY_BROKER_URL
    scheme = urlparse(url).scheme
    if scheme in ("memory", ""):
        return "skipped"
    if scheme in ("redis", "rediss"):
        return _ping_redis(url, timeout)
    from kombu import Connection

    with Connection(url, connect_timeout=timeout, transport_options={"max_retries": 0}) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
    return "ok"


_CHECK_FUNCTIONS: dict[str, Callable[[float], CheckResult]] = {
    "database": check_database,
    "redis": check_redis,
    "broker": check_broker,
}


def readiness_report() -> tuple[str, dict[str, dict[str, Any]]]:
    """Run every check; return the overall status (ok|degraded|fail) and each check's report."""
    timeout = settings.HEALTH_CHECK_TIMEOUT
    required = set(settings.HEALTH_REQUIRED_CHECKS)
    results = {name: _CHECK_FUNCTIONS[name](timeout) for name in CHECKS}
    failed = {name for name, result in results.items() if result.status == "fail"}
    if failed & required:
        overall = "fail"
    elif failed:
        overall = "degraded"
    else:
        overall = "ok"
    checks = {
        name: result.as_dict() | {"required": name in required} for name, result in results.items()
    }
    return overall, checks


_migrated = False


def migrations_applied() -> bool:
    """True once every migration on disk is applied; cached once true (they stay applied)."""
    global _migrated  # noqa: PLW0603 - a process-wide latch
    if _migrated:
        return True
    from django.db.migrations.executor import MigrationExecutor

    loader = MigrationExecutor(connections[DEFAULT_DB_ALIAS]).loader
    # Every node on disk, not the plan to the leaves: Django plans nothing for an applied
    # leaf even when a migration before it is missing from the record.
    if set(loader.graph.nodes) <= set(loader.applied_migrations):
        _migrated = True
    return _migrated


def startup_latch_reset() -> None:
    """Forget that migrations were found applied (tests, or after a deliberate rollback)."""
    global _migrated  # noqa: PLW0603
    _migrated = False
