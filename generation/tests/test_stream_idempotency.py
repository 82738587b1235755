"""An Idempotency-Key on a streamed chat completion: the first stream is charged once and its
answer kept, a retry with the key gets it again as a stream (not charged); a retry while the
first runs is a 409; a stream that fails, or that its client leaves, releases the key, so
that the retry runs (and is charged) again. Through an unmodified OpenAI SDK."""

from __future__ import annotations

import time
from decimal import Decimal

import openai
import pytest

from generation.tests.fake_upstream import Behaviour
from quotas.models import Plan, UsageRecord, UserQuota
from quotas.policy import micros_text, usd_to_micros
from quotas.services import quota_standing

pytestmark = pytest.mark.django_db(transaction=True)  # the live server answers on threads

ASK = {"model": "gpt-test", "messages": [{"role": "user", "content": "tell me a story"}]}
TEXT = " ".join(f"word{i}" for i in range(40))
LONG = " ".join(f"word{i}" for i in range(300))


@pytest.fixture
def metered(api_key):
    """The key's user on a plan with day budgets, so that Redis counts what it spends."""
    plan = Plan.objects.create(
        name="metered",
        requests_per_day=100,
        tokens_per_day=100_000,
        cost_per_day=Decimal("10.00"),
    )
    UserQuota.objects.update_or_create(user=api_key[1].user, defaults={"plan": plan})
    return api_key[1].user


def _key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name}


def _text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _idempotency_slots(redis_conn) -> list:
    return list(redis_conn.scan_iter("*idem:*"))


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def _counters_match_the_ledger(user) -> list[UsageRecord]:
    """Redis's day counters hold exactly what the ledger charged (a refunded request is not
    counted); the ledger's rows."""
    rows = list(UsageRecord.objects.order_by("created_at", "id"))
    counted = [r for r in rows if r.outcome in ("ok", "cached")]
    limits = quota_standing(user_id=user.pk)["limits"]
    assert limits["requests_per_day"]["used"] == len(counted)
    assert limits["tokens_per_day"]["used"] == sum(
        r.prompt_tokens + r.completion_tokens for r in counted
    )
    assert limits["cost_per_day"]["used"] == micros_text(
        sum(usd_to_micros(r.cost_usd) for r in counted)
    )
    assert limits["concurrency"]["used"] == 0
    return rows


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_retried_with_its_idempotency_key_is_replayed_charged_once(
    fake_upstream, tollgate, metered
):
    fake_upstream.default = Behaviour(text=TEXT, usage=(9, 40))
    ask = {**ASK, "stream": True, "stream_options": {"include_usage": True}}

    first = tollgate.chat.completions.with_raw_response.create(
        **ask, extra_headers=_key("order-42")
    )
    first_chunks = list(first.parse())
    again = tollgate.chat.completions.with_raw_response.create(
        **ask, extra_headers=_key("order-42")
    )
    again_chunks = list(again.parse())

    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Content-Type"].startswith("text/event-stream")
    assert again.headers["X-Cache"] == first.headers["X-Cache"] == "MISS"
    assert _text(again_chunks) == _text(first_chunks) == TEXT
    assert len([c for c in again_chunks if c.choices]) > 2  # in pieces, as a stream comes
    assert {c.id for c in again_chunks} == {c.id for c in first_chunks}  # the same answer
    assert again_chunks[-2].choices[0].finish_reason == "stop"
    assert again_chunks[-1].usage == first_chunks[-1].usage
    assert (again_chunks[-1].usage.prompt_tokens, again_chunks[-1].usage.completion_tokens) == (
        9,
        40,
    )
    assert len(fake_upstream.requests) == 1
    [row] = _counters_match_the_ledger(metered)  # the replay is neither counted nor charged
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("ok", 9, 40)
    assert row.cost_usd > 0


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_replay_without_include_usage_has_no_usage_chunk(fake_upstream, tollgate):
    fake_upstream.default = Behaviour(text=TEXT, usage=(9, 40))
    list(tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1")))

    replay = list(tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1")))

    assert _text(replay) == TEXT
    assert all(c.usage is None for c in replay)
    assert replay[-1].choices[0].finish_reason == "stop"


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_retried_while_the_first_runs_is_409(fake_upstream, tollgate, metered):
    fake_upstream.default = Behaviour(kind="paced", delay=0.05, text=TEXT, usage=(9, 40))
    stream = tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))
    chunks = [next(stream), next(stream)]

    with pytest.raises(openai.ConflictError) as info:
        tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))
    chunks.extend(stream)
    replay = tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))

    assert info.value.status_code == 409
    assert info.value.body["code"] == "idempotency_conflict"
    assert info.value.body["type"] == "conflict_error"
    assert _text(chunks) == _text(replay) == TEXT
    assert len(fake_upstream.requests) == 1
    [row] = _counters_match_the_ledger(metered)
    assert row.completion_tokens == 40


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_same_idempotency_key_streamed_then_not_is_409(fake_upstream, tollgate):
    """`stream` is part of what a request asks for: a stream and a whole answer are two
    requests, as two different bodies are."""
    fake_upstream.default = Behaviour(text=TEXT, usage=(9, 40))
    list(tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1")))

    with pytest.raises(openai.ConflictError) as info:
        tollgate.chat.completions.create(**ASK, extra_headers=_key("k1"))

    assert info.value.body["code"] == "idempotency_conflict"
    assert len(fake_upstream.requests) == 1


@pytest.mark.usefixtures("upstream_settings", "openai_model")
@pytest.mark.parametrize(
    "failure",
    [
        Behaviour(kind="cut", text=TEXT, usage=(9, 40)),  # mid-stream: an error event
        Behaviour(kind="status", status=500),  # before the first piece: a JSON 502
    ],
    ids=["error-event", "json-error"],
)
def test_openai_sdk_failed_stream_releases_its_idempotency_key_and_the_retry_runs(
    fake_upstream, tollgate, metered, upstream_settings, failure
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(failure, Behaviour(text=TEXT, usage=(9, 40)))

    with pytest.raises(openai.APIError):
        list(tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1")))
    retry = tollgate.chat.completions.with_raw_response.create(
        **ASK, stream=True, extra_headers=_key("k1")
    )
    retried = _text(retry.parse())
    replay = tollgate.chat.completions.with_raw_response.create(
        **ASK, stream=True, extra_headers=_key("k1")
    )

    assert "Idempotent-Replayed" not in retry.headers
    assert retried == _text(replay.parse()) == TEXT
    assert replay.headers["Idempotent-Replayed"] == "true"  # the retry's answer is kept
    assert len(fake_upstream.requests) == 2
    refunded, charged = _counters_match_the_ledger(metered)
    assert (refunded.outcome, refunded.cost_usd) == ("upstream_error", 0)
    assert (charged.outcome, charged.completion_tokens) == ("ok", 40)


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_left_mid_way_releases_its_idempotency_key_and_the_retry_runs(
    fake_upstream, tollgate, metered, redis_conn
):
    """The client that left paid for what it was sent; its retry is a new answer, run and
    charged again, not the part it was sent, nor the whole it never got."""
    fake_upstream.script(
        Behaviour(kind="paced", delay=0.05, text=LONG, usage=(9, 300)),
        Behaviour(text=TEXT, usage=(9, 40)),
    )
    stream = tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))
    next(stream)
    next(stream)

    stream.close()  # the client goes away: the server finds out at its next writes
    _wait_for(lambda: UsageRecord.objects.exists() and not _idempotency_slots(redis_conn))
    retry = tollgate.chat.completions.with_raw_response.create(
        **ASK, stream=True, extra_headers=_key("k1")
    )

    assert "Idempotent-Replayed" not in retry.headers
    assert _text(retry.parse()) == TEXT
    assert len(fake_upstream.requests) == 2
    left, again = _counters_match_the_ledger(metered)
    assert 0 < left.completion_tokens < 300  # what it was sent
    assert left.cost_usd > 0
    assert (again.completion_tokens, again.cost_usd > 0) == (40, True)


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_outlasting_its_idempotency_claim_keeps_it_until_it_ends(
    fake_upstream, tollgate, metered, upstream_settings, monkeypatch
):
    """A stream lasts as long as its client reads: its key stays claimed as long as the
    stream's lease is renewed, or a retry meanwhile would run, and be charged, again."""
    from generation.services import idempotency

    monkeypatch.setattr(idempotency, "idempotency_claim_seconds", lambda upstream_calls=1: 1)
    upstream_settings.QUOTA_LEASE_TTL = 1
    text = " ".join(f"word{i}" for i in range(75))  # some 25 events: 2.5 s
    fake_upstream.default = Behaviour(kind="paced", delay=0.1, text=text, usage=(9, 75))
    stream = tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))
    chunks = []
    started = time.monotonic()
    while time.monotonic() - started < 2.2:  # past the claim's life, twice
        chunks.append(next(stream))

    with pytest.raises(openai.ConflictError):
        tollgate.chat.completions.create(**ASK, stream=True, extra_headers=_key("k1"))
    chunks.extend(stream)

    assert _text(chunks) == text
    assert len(fake_upstream.requests) == 1
    [row] = _counters_match_the_ledger(metered)
    assert row.completion_tokens == 75
