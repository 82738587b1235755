"""A stream the client leaves is settled when the server closes its response: whatever it
was sent is charged, its concurrency lease is released and a half-open circuit's probe is
given back, at once, whether the client read part of it or nothing at all."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from generation.tests.fake_upstream import Behaviour
from generation.tokens import tokens_count
from quotas.models import Plan, UsageRecord, UserQuota
from quotas.policy import micros_text, usd_to_micros
from quotas.services import quota_standing

pytestmark = pytest.mark.django_db(transaction=True)  # a response's close ends its request

CHAT = "/v1/chat/completions"
GENERATE = "/api/v1/generate"
ASK = {"model": "gpt-test", "messages": [{"role": "user", "content": "tell me a long story"}]}
LONG = " ".join(f"word{i}" for i in range(300))


@pytest.fixture
def one_at_a_time(api_key):
    """The key's user may have one request in flight."""
    plan = Plan.objects.create(name="one-at-a-time", concurrency=1)
    UserQuota.objects.update_or_create(user=api_key[1].user, defaults={"plan": plan})


def _stream(key_client):
    response = key_client.post(CHAT, {**ASK, "stream": True}, format="json")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["X-Accel-Buffering"] == "no"  # nginx passes each event on at once
    return response


def _text_of(event: bytes) -> str:
    body = json.loads(event.decode().removeprefix("data: "))
    return body["choices"][0]["delta"]["content"]


@pytest.mark.usefixtures("one_at_a_time")
def test_stream_left_after_its_first_piece_is_charged_for_it_and_frees_its_lease(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text=LONG, usage=(9, 300))
    response = _stream(key_client)
    events = iter(response.streaming_content)
    next(events)  # the assistant's role
    first = _text_of(next(events))

    response.close()  # the server's part when the client has gone away

    row = UsageRecord.objects.get()
    assert row.completion_tokens == tokens_count(first) > 0
    assert row.completion_tokens < 300  # not the whole answer it never saw
    assert row.prompt_tokens > 0
    again = key_client.post(CHAT, ASK, format="json")  # concurrency 1: the lease is free
    assert again.status_code == 200, again.content


@pytest.mark.usefixtures("one_at_a_time")
def test_stream_left_before_its_first_event_pays_its_prompt_and_frees_its_lease(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text=LONG, usage=(9, 300))
    response = _stream(key_client)

    response.close()

    row = UsageRecord.objects.get()
    assert row.completion_tokens == 0
    assert row.prompt_tokens > 0
    assert key_client.post(CHAT, ASK, format="json").status_code == 200


@pytest.mark.usefixtures("half_open_circuit", "openai_model")
def test_stream_left_while_it_probes_a_half_open_circuit_gives_the_probe_back(
    fake_upstream, key_client
):
    fake_upstream.default = Behaviour(text=LONG)

    _stream(key_client).close()  # the probe

    again = key_client.post(CHAT, ASK, format="json")
    assert again.status_code == 200, again.content  # not 503: the probe was given back


@pytest.mark.usefixtures("one_at_a_time")
def test_a_stream_outlasting_the_lease_keeps_it_until_it_ends(
    upstream_settings, fake_upstream, openai_model, key_client
):
    """The sweep refunds reservations whose lease ran out, taking their worker for dead; a
    long stream renews its own, so concurrency stays exact while it runs."""
    from quotas.services import reservations_sweep

    upstream_settings.QUOTA_LEASE_TTL = 1
    text = " ".join(f"word{i}" for i in range(75))  # some 25 events: 2.5 s
    fake_upstream.default = Behaviour(kind="paced", delay=0.1, text=text, usage=(9, 75))
    response = _stream(key_client)
    events = iter(response.streaming_content)
    started = time.monotonic()
    while time.monotonic() - started < 1.6:  # past the lease's life
        next(events)

    reservations_sweep()
    meanwhile = key_client.post(GENERATE, {"prompt": "now", "model": "gpt-test"}, format="json")
    rest = b"".join(events)
    response.close()
    after = key_client.post(CHAT, ASK, format="json")

    assert meanwhile.status_code == 429, meanwhile.content
    assert meanwhile.json()["error"]["dimension"] == "concurrency"
    assert rest.endswith(b"data: [DONE]\n\n")
    assert UsageRecord.objects.get(completion_tokens=75).prompt_tokens == 9
    assert after.status_code == 200, after.content


def test_a_stream_whose_client_stops_reading_keeps_its_lease_and_is_charged_once(
    upstream_settings, fake_upstream, openai_model, key_client, api_key
):
    """A client that stops reading (its socket buffer full, the worker blocked in send) pulls
    nothing from the stream for as long as it likes; the stream renews its reservation and
    lease all the same, so the sweep leaves them alone, no other request takes its
    concurrency slot, and its settlement still finds its reservation to charge."""
    from quotas.tasks import quota_sweep

    upstream_settings.QUOTA_LEASE_TTL = 2
    plan = Plan.objects.create(
        name="one-at-a-time-metered",
        concurrency=1,
        requests_per_day=100,
        tokens_per_day=100_000,
        cost_per_day=Decimal("10.00"),
    )
    user = api_key[1].user
    UserQuota.objects.update_or_create(user=user, defaults={"plan": plan})
    fake_upstream.default = Behaviour(text=LONG, usage=(9, 300))
    response = _stream(key_client)
    events = iter(response.streaming_content)
    next(events)  # the assistant's role
    next(events)  # the first piece of text

    time.sleep(3)  # the client reads nothing past the lease's life (2 s)...
    quota_sweep()  # ...while the sweep looks for dead workers' reservations
    meanwhile = key_client.post(GENERATE, {"prompt": "now", "model": "gpt-test"}, format="json")
    time.sleep(1.5)  # and on past the reservation record's own life (twice the lease's)
    rest = b"".join(events)
    response.close()

    assert meanwhile.status_code == 429, meanwhile.content
    assert meanwhile.json()["error"]["dimension"] == "concurrency"
    assert rest.endswith(b"data: [DONE]\n\n")
    rows = list(UsageRecord.objects.all())
    limits = quota_standing(user_id=user.pk)["limits"]  # Redis's day counters
    assert limits["requests_per_day"]["used"] == len(rows)
    assert limits["tokens_per_day"]["used"] == sum(
        r.prompt_tokens + r.completion_tokens for r in rows
    )
    assert limits["cost_per_day"]["used"] == micros_text(
        sum(usd_to_micros(r.cost_usd) for r in rows)
    )
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(9, 300)]  # the stream's
    assert limits["concurrency"]["used"] == 0  # freed by the settlement


@pytest.mark.usefixtures("one_at_a_time")
def test_a_stream_broken_by_an_unexpected_error_frees_its_lease_at_once(
    upstream_settings, fake_upstream, openai_model, key_client, monkeypatch
):
    """Not a provider's failure but a mistake of ours (a bug, a MemoryError) mid-stream: the
    request is refunded as an upstream error, not left holding its concurrency lease and
    reservation until the sweep takes its worker for dead (QUOTA_LEASE_TTL, 5 minutes)."""
    from generation.providers.openai_compat import OpenAIProvider

    original = OpenAIProvider.stream

    def breaking(self, request, *, timeout):
        pieces = original(self, request, timeout=timeout)
        yield next(pieces)
        pieces.close()
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(OpenAIProvider, "stream", breaking)
    fake_upstream.default = Behaviour(text=LONG, usage=(9, 300))
    response = _stream(key_client)
    body = b"".join(response.streaming_content)
    response.close()
    monkeypatch.setattr(OpenAIProvider, "stream", original)

    # The client's stream ends as a cut one does: an error event, then [DONE].
    assert b'"code":"internal_error"' in body.replace(b" ", b"")
    assert body.endswith(b"data: [DONE]\n\n")

    assert UsageRecord.objects.get().cost_usd == 0
    again = key_client.post(CHAT, ASK, format="json")  # concurrency 1: the lease is free
    assert again.status_code == 200, again.content
