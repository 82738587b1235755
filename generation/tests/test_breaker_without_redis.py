"""The circuit breaker without a shared Redis: in-process for the embedded default, and out
of the way (calls go through) when Redis is unreachable."""

from __future__ import annotations

import pytest

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
