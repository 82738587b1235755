"""The circuit breaker without a shared Redis: in-process for the embedded default, and out
of the way (calls go through) when Redis is unreachable."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from config.tests.redis_server import point_settings_at
from generation import resilience
from generation.resilience import Breaker, CircuitOpen


@pytest.fixture
def embedded(settings):
    settings.REDIS_URL = ""
    settings.CIRCUIT_FAILURE_THRESHOLD = 3
    settings.CIRCUIT_RESET_SECONDS = 30
    resilience._local = resilience._LocalCircuits()
    return settings


def test_embedded_breaker_opens_after_threshold_and_recovers_half_open(embedded):
    breaker = Breaker("local", "local/demo")
    for _ in range(3):
        breaker.allow(now=1000.0)
        breaker.record_failure(now=1000.0)
    with pytest.raises(CircuitOpen):
        breaker.allow(now=1001.0)
    states = resilience.circuit_states(now=1001.0)
    assert [(s["state"], s["failures"]) for s in states] == [("open", 3)]
    # After the reset period one probe goes through, a second caller waits for it.
    assert breaker.allow(now=1031.0)[0] == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.allow(now=1031.0)
    breaker.record_success()
    assert breaker.allow(now=1032.0) == ("closed", 0)
    assert resilience.circuit_states(now=1032.0) == []


def test_breaker_steps_aside_when_redis_is_unreachable(settings):
    settings.CACHES = {
        "default": {
            **settings.CACHES["default"],
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {**settings.CACHES["default"]["OPTIONS"], "SOCKET_CONNECT_TIMEOUT": 0.2},
        }
    }
    resilience._scripts.clear()
    breaker = Breaker("openai", "gpt-test")
    assert breaker.allow() == ("closed", 0)
    assert breaker.record_failure() == "closed"
    breaker.record_success()
    assert resilience.circuit_states() == []
    resilience._scripts.clear()


class _HungRedis:
    """A TCP server that accepts connections and never answers (a Redis frozen or cut off
    behind a dead link), counting the connections it was offered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def hung_redis(settings, monkeypatch):
    """Settings pointed at a hung Redis; `hung_redis.cured()` points them back at the
    shared one, as if it answered again."""
    server = _HungRedis()
    shared = (settings.REDIS_URL, settings.CACHES)

    def cured() -> None:
        settings.REDIS_URL, settings.CACHES = shared
        resilience._scripts.clear()

    server.cured = cured  # type: ignore[attr-defined]
    point_settings_at(settings, server)
    monkeypatch.setattr(resilience._outage(), "retry_seconds", 0.3)
    resilience._scripts.clear()
    resilience._redis_away.reset()
    yield server
    server.close()
    resilience._scripts.clear()
    resilience._redis_away.reset()


def test_breaker_asks_a_hung_redis_once_per_retry_period_and_says_so_once(hung_redis, caplog):
    breaker = Breaker("openai", "gpt-test")

    with caplog.at_level(logging.WARNING, logger="tollgate.generation"):
        for _ in range(5):
            assert breaker.allow() == ("closed", 0)
            assert breaker.record_failure() == "closed"
            breaker.record_success()
        asked_during_the_period = len(hung_redis.accepted)
        time.sleep(0.35)
        assert breaker.allow() == ("closed", 0)

    # Fifteen calls within the period cost one wait on Redis, not fifteen; past it,
    # Redis is asked again.
    assert asked_during_the_period == 1
    assert len(hung_redis.accepted) == 2
    told = [r.getMessage() for r in caplog.records if "circuit state" in r.getMessage()]
    assert len(told) == 1
    assert "Redis down" in told[0]


def test_breaker_shares_its_state_through_redis_again_once_it_answers(
    settings, redis_conn, hung_redis, caplog
):
    settings.CIRCUIT_FAILURE_THRESHOLD = 1
    settings.CIRCUIT_RESET_SECONDS = 30
    breaker = Breaker("openai", "gpt-test")
    assert breaker.allow() == ("closed", 0)  # the hung Redis: the outage begins
    hung_redis.cured()
    time.sleep(0.35)

    with caplog.at_level(logging.WARNING, logger="tollgate.generation"):
        assert breaker.allow() == ("closed", 0)
        assert breaker.record_failure() == "open"

    with pytest.raises(CircuitOpen):
        breaker.allow()
    assert [s["state"] for s in resilience.circuit_states()] == ["open"]  # in Redis
    assert any("available again" in r.getMessage() for r in caplog.records)
