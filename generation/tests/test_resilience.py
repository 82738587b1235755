from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from django.conf import settings

from generation.providers.base import CompletionRequest
from generation.resilience import (
    Breaker,
    CircuitOpen,
    circuit_states,
    upstream_complete,
    upstream_stream,
)
from generation.tests.fake_upstream import Behaviour

pytestmark = pytest.mark.django_db

URL = "/api/v1/generate"

_PEEK = """
import json, django
django.setup()
from generation.resilience import Breaker, CircuitOpen
try:
    state, failures = Breaker("openai", "gpt-4o-mini").allow()
    print(json.dumps({"allowed": True, "state": state}))
except CircuitOpen as exc:
    print(json.dumps({"allowed": False, "retry_after": exc.retry_after}))
"""

_FAIL = """
import json, django
django.setup()
from generation.resilience import Breaker
print(json.dumps(Breaker("openai", "gpt-4o-mini").record_failure()))
"""


def _other_process_view(code: str = _PEEK) -> Any:
    """Run `code` in a separate Python process sharing only Redis (by default: ask whether
    the circuit lets it through); returns the JSON it printed last."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "CIRCUIT_RESET_SECONDS": str(settings.CIRCUIT_RESET_SECONDS),
        "CIRCUIT_FAILURE_THRESHOLD": str(settings.CIRCUIT_FAILURE_THRESHOLD),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(settings.BASE_DIR),
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _request(text: str = "hi") -> CompletionRequest:
    return CompletionRequest(
        model="gpt-4o-mini", messages=({"role": "user", "content": text},), max_tokens=16
    )


def test_circuit_opens_after_threshold_and_another_process_sees_it_open(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 3
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)

    statuses = [
        key_client.post(URL, {"prompt": f"q{i}", "model": "gpt-test"}, format="json").status_code
        for i in range(4)
    ]

    assert statuses == [502, 502, 502, 503]
    assert len(fake_upstream.requests) == 3  # the fourth never left Tollgate
    assert _other_process_view()["allowed"] is False
    [state] = circuit_states()
    assert state["provider"] == "openai"
    assert state["model"] == "gpt-4o-mini"
    assert state["state"] == "open"
    assert state["retry_in"] > 0


def test_circuit_open_error_is_503_upstream_unavailable_with_retry_after(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)
    key_client.post(URL, {"prompt": "a", "model": "gpt-test"}, format="json")

    response = key_client.post(URL, {"prompt": "b", "model": "gpt-test"}, format="json")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert 1 <= int(response["Retry-After"]) <= 30


def test_circuit_half_open_lets_one_probe_through_and_recovers(upstream_settings, fake_upstream):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 2
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    upstream_settings.CIRCUIT_RESET_SECONDS = 0.5
    fake_upstream.default = Behaviour(kind="status", status=500)
    for _ in range(2):
        with pytest.raises(Exception, match="provider returned an error"):
            upstream_complete(provider="openai", request=_request())
    assert circuit_states()[0]["state"] == "open"
    time.sleep(0.6)  # let the open period end
    fake_upstream.default = Behaviour(text="healthy again")

    result = upstream_complete(provider="openai", request=_request())

    assert result.text == "healthy again"
    assert circuit_states() == []  # closed, failures forgotten
    assert _other_process_view() == {"allowed": True, "state": "closed"}


@pytest.mark.usefixtures("half_open_circuit")
def test_circuit_half_open_failed_probe_opens_again(fake_upstream):
    with pytest.raises(Exception, match="provider returned an error"):
        upstream_complete(provider="openai", request=_request())  # the probe fails

    assert circuit_states()[0]["state"] == "open"
    assert len(fake_upstream.requests) == 2


def test_breaker_half_open_admits_a_single_probe_at_a_time(upstream_settings):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    breaker = Breaker("openai", "probe-model")
    breaker.record_failure(now=1000.0)

    with pytest.raises(CircuitOpen):
        breaker.allow(now=1001.0)
    assert breaker.allow(now=1031.0) == ("half_open", 1)
    with pytest.raises(CircuitOpen):
        breaker.allow(now=1031.5)  # the probe is still out
    breaker.record_success()
    assert breaker.allow(now=1032.0) == ("closed", 0)


def test_breaker_trusts_a_closed_circuit_for_a_while_but_sees_its_own_failure_at_once(
    upstream_settings,
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.CIRCUIT_CLOSED_CACHE_SECONDS = 60
    breaker = Breaker("openai", "gpt-4o-mini")
    assert breaker.allow() == ("closed", 0)
    assert _other_process_view(_FAIL) == "open"  # another worker opens the circuit

    assert breaker.allow() == ("closed", 0)  # trusted without asking Redis again
    assert breaker.record_failure() == "open"
    with pytest.raises(CircuitOpen):
        breaker.allow()


def test_breaker_sees_a_circuit_opened_by_another_worker_once_the_closed_period_ends(
    upstream_settings,
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.CIRCUIT_CLOSED_CACHE_SECONDS = 0.2
    breaker = Breaker("openai", "gpt-4o-mini")
    assert breaker.allow() == ("closed", 0)
    assert _other_process_view(_FAIL) == "open"
    time.sleep(0.25)  # the subprocess alone usually takes longer; this makes it certain

    with pytest.raises(CircuitOpen):
        breaker.allow()


def test_rate_limits_do_not_trip_the_circuit(upstream_settings, fake_upstream):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="status", status=429, retry_after="0")

    with pytest.raises(Exception, match="unavailable"):
        upstream_complete(provider="openai", request=_request())

    assert circuit_states() == []


def test_success_resets_the_consecutive_failure_count(upstream_settings, fake_upstream):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 2
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(
        Behaviour(kind="status", status=500), Behaviour(), Behaviour(kind="status", status=500)
    )
    for _ in range(3):
        with contextlib.suppress(Exception):
            upstream_complete(provider="openai", request=_request())

    assert circuit_states()[0]["state"] == "closed"
    assert circuit_states()[0]["failures"] == 1


def test_retries_stop_at_max_attempts(upstream_settings, fake_upstream):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 4
    fake_upstream.default = Behaviour(kind="status", status=502)

    with pytest.raises(Exception, match="provider returned an error"):
        upstream_complete(provider="gemini", request=_request())

    assert len(fake_upstream.requests) == 4


def test_connection_refused_is_503_unavailable(upstream_settings):
    upstream_settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    from generation.errors import UpstreamUnavailable
    from generation.providers import providers_reset

    providers_reset()

    with pytest.raises(UpstreamUnavailable):
        upstream_complete(provider="openai", request=_request())


def test_open_circuit_serves_stale_copy_when_policy_allows(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(text="kept answer")
    body = {"prompt": "remember me", "model": "gpt-test"}
    assert key_client.post(URL, body, format="json").status_code == 200
    Breaker("openai", "gpt-4o-mini").record_failure()  # the provider starts failing

    response = key_client.post(URL, {**body, "cache": "refresh"}, format="json")

    assert response.status_code == 200
    assert response["X-Cache"] == "STALE"
    assert response.json()["fallback"] is True
    assert response.json()["text"] == "kept answer"
    assert len(fake_upstream.requests) == 1


def test_open_circuit_stale_copy_is_recorded_as_the_fallback_it_served(
    upstream_settings, fake_upstream, openai_model, key_client, user
):
    # The ledger and the metrics say what the client got, as for a quota's fallback: a
    # cached answer served as a fallback, free. The failed attempt is refunded whole, so
    # only the first request counts, in Redis as in counters rebuilt from the ledger.
    from prometheus_client import REGISTRY

    from quotas import services
    from quotas.models import UsageRecord
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    plan = PlanFactory(requests_per_day=100, tokens_per_day=100_000, cost_per_day="5.00")
    UserQuotaFactory(user=user, plan=plan)
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(text="kept answer", usage=(1000, 500))
    body = {"prompt": "remember me", "model": "gpt-test"}
    assert key_client.post(URL, body, format="json").status_code == 200
    Breaker("openai", "gpt-4o-mini").record_failure()  # the provider starts failing
    fallbacks = REGISTRY.get_sample_value("tollgate_stale_fallbacks_total") or 0.0

    response = key_client.post(URL, {**body, "cache": "refresh"}, format="json")

    assert response["X-Cache"] == "STALE"
    assert response.json()["cached"] is response.json()["fallback"] is True
    row = UsageRecord.objects.get(request_id=response.json()["request_id"])
    assert (row.outcome, row.cached, row.fallback) == ("cached", True, True)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_usd) == (0, 0, 0)
    assert REGISTRY.get_sample_value("tollgate_stale_fallbacks_total") == fallbacks + 1

    def used() -> dict[str, object]:  # the counts, not the reset times, read a moment apart
        limits = services.quota_standing(user_id=user.pk)["limits"]
        return {name: entry["used"] for name, entry in limits.items()}

    live = services.quota_standing(user_id=user.pk)["limits"]
    # 1000 x 0.15 / 1e6 + 500 x 0.60 / 1e6: the first request's cost, and nothing more.
    assert live["cost_per_day"]["used"] == "0.00045"
    assert (live["requests_per_day"]["used"], live["tokens_per_day"]["used"]) == (1, 1500)
    before = used()
    services.counters_rebuild_all()  # a new counter epoch: day counters from the ledger
    services.local_state_reset()
    assert used() == before


def test_gemini_429_retry_after_is_honoured(upstream_settings, fake_upstream):
    fake_upstream.script(Behaviour(kind="status", status=429, retry_after="1"), Behaviour())

    upstream_complete(provider="gemini", request=_request())

    first, second = fake_upstream.requests
    assert second.at - first.at >= 1.0


def test_half_open_probe_answered_429_lets_the_next_caller_probe(upstream_settings, fake_upstream):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    upstream_settings.CIRCUIT_RESET_SECONDS = 0.3
    fake_upstream.script(
        Behaviour(kind="status", status=500),
        Behaviour(kind="status", status=429, retry_after="0"),
        Behaviour(text="back"),
    )
    with pytest.raises(Exception, match="provider returned an error"):
        upstream_complete(provider="openai", request=_request())
    time.sleep(0.4)
    with pytest.raises(Exception, match="unavailable"):
        upstream_complete(provider="openai", request=_request())  # probe: rate limited

    assert upstream_complete(provider="openai", request=_request()).text == "back"
    assert circuit_states() == []


def test_open_circuit_is_listed_by_quota_global(upstream_settings, api_client, user):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    Breaker("gemini", "gemini-2.0-flash").record_failure()
    user.is_staff = True
    user.save()
    api_client.force_authenticate(user)

    response = api_client.get("/api/v1/quota/global", secure=True)

    assert response.status_code == 200
    [circuit] = response.json()["circuits"]
    assert circuit["provider"] == "gemini"
    assert circuit["state"] == "open"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # the HTTP-date form
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # a date gone by: no wait
        ("-5", None),
        ("inf", None),
        ("soon", None),
    ],
)
def test_retry_after_is_read_in_both_forms_of_rfc_9110(header, seconds):
    from generation.providers.base import parse_retry_after

    at_07_28_00 = 1445412480.0

    assert parse_retry_after(header, now=at_07_28_00) == seconds


_CHUNK = json.dumps(
    {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": "first words "}}],
    }
)


@pytest.mark.parametrize(
    ("provider", "events"),
    [
        ("openai", ["123"]),
        ("openai", ['{"choices": [{"index": 0, "delta": 5}]}']),
        ("gemini", ["true"]),
    ],
)
def test_stream_of_unexpected_shape_before_its_first_piece_is_a_502(
    upstream_settings, fake_upstream, provider, events
):
    from generation.errors import UpstreamError

    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    body = "".join(f"data: {event}\n\n" for event in events)
    fake_upstream.default = Behaviour(kind="raw", body=body)

    with pytest.raises(UpstreamError):
        upstream_stream(provider=provider, request=_request())

    assert len(fake_upstream.requests) == 2  # a malformed answer is retried


@pytest.mark.parametrize("odd", ['{"choices": 5}', "123"])
def test_stream_of_unexpected_shape_after_its_first_piece_ends_in_a_502(
    upstream_settings, fake_upstream, odd
):
    from generation.errors import UpstreamError

    fake_upstream.default = Behaviour(kind="raw", body=f"data: {_CHUNK}\n\ndata: {odd}\n\n")
    pieces = upstream_stream(provider="openai", request=_request())

    assert next(pieces) == "first words "
    with pytest.raises(UpstreamError):
        next(pieces)


@pytest.mark.parametrize("body", ["", "data: [DONE]\n\n"])
def test_openai_stream_without_a_single_chunk_is_a_502_not_an_empty_answer(
    upstream_settings, fake_upstream, body
):
    from generation.errors import UpstreamError

    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="raw", body=body)

    with pytest.raises(UpstreamError):
        upstream_stream(provider="openai", request=_request())

    assert len(fake_upstream.requests) == 2


def test_an_answer_slower_than_the_retry_budget_but_within_the_read_timeout_is_served(
    upstream_settings, fake_upstream
):
    # A long generation: the provider answers after 1.2 s, within the 2 s read timeout but
    # past the 0.5 s retry budget. The budget bounds retries, it does not cut the attempt.
    upstream_settings.UPSTREAM_READ_TIMEOUT = 2.0
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 0.5
    fake_upstream.default = Behaviour(kind="slow", delay=1.2, text="long answer")

    result = upstream_complete(
        provider="openai",
        request=CompletionRequest(
            model="gpt-4o-mini",
            messages=({"role": "user", "content": "write a lot"},),
            max_tokens=100,
        ),
    )

    assert result.text == "long answer"
    assert len(fake_upstream.requests) == 1


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_stream_begun_late_in_the_retry_budget_waits_the_whole_read_timeout_between_pieces(
    upstream_settings, fake_upstream, provider
):
    # The first attempt fails and asks for 0.5 s: the second begins with some 0.3 s of the
    # 0.8 s budget left, its first piece comes at once, the next ones 0.5 s apart. The
    # budget bounds the wait for the first piece; the answer begun is read as any other,
    # each piece waited for up to the 0.8 s read timeout, not cut at the budget's end.
    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.8
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 0.8
    text = "one two three four five six"
    fake_upstream.script(
        Behaviour(kind="status", status=500, retry_after="0.5"),
        Behaviour(kind="paced", delay=0.5, text=text, usage=(3, 6)),
    )

    pieces = list(upstream_stream(provider=provider, request=_request()))

    assert "".join(p for p in pieces if isinstance(p, str)) == text
    assert pieces[-1].completion_tokens == 6
    assert len(fake_upstream.requests) == 2


@pytest.mark.parametrize(
    ("provider", "late"),
    [
        # The role's event at once, the first piece of text 1.2 s later.
        ("openai", Behaviour(kind="paced", delay=1.2, text="one two three", at_once=1)),
        ("gemini", Behaviour(kind="slow", delay=1.2, text="one two three")),
    ],
    ids=["openai", "gemini"],
)
def test_a_stream_begun_late_in_the_retry_budget_waits_for_its_first_piece_a_read_timeout(
    upstream_settings, fake_upstream, provider, late
):
    # As above, but the first piece comes 1.2 s after the attempt began: past the 0.8 s read
    # timeout, which bounds each wait of a stream, the first one included. No attempt is
    # left to try in the budget: a 504.
    from generation.errors import UpstreamTimeout

    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.8
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 0.8
    fake_upstream.script(Behaviour(kind="status", status=500, retry_after="0.5"), late)

    with pytest.raises(UpstreamTimeout):
        upstream_stream(provider=provider, request=_request())

    assert len(fake_upstream.requests) == 2
