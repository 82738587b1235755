from __future__ import annotations

import json
import logging
import time
from decimal import Decimal
from email.utils import formatdate

import pytest

from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord

pytestmark = pytest.mark.django_db

URL = "/api/v1/generate"


def _post(client, body, **headers):
    return client.post(URL, body, format="json", **headers)


def test_generate_openai_success_charges_exact_cost_in_ledger(
    upstream_settings, fake_upstream, openai_model, key_client, api_key
):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(user=api_key[1].user, plan=PlanFactory(requests_per_minute=60))
    fake_upstream.script(Behaviour(text="Paris.", usage=(1234, 567)))

    response = _post(key_client, {"prompt": "Capital of France?", "model": "gpt-test"})

    assert response.status_code == 200, response.content
    body = response.json()
    # 1234 x 0.15 / 1e6 + 567 x 0.60 / 1e6 = 0.0001851 + 0.0003402, to the last digit
    assert body["cost_usd"] == "0.0005253"
    assert body["text"] == "Paris."
    assert body["usage"] == {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}
    assert body["cached"] is False
    assert body["fallback"] is False
    assert response["X-Cache"] == "MISS"
    assert response["X-RateLimit-Limit-Requests"] == "60"
    assert response["X-RateLimit-Remaining-Requests"] == "59"
    row = UsageRecord.objects.get(request_id=body["request_id"])
    assert (row.prompt_tokens, row.completion_tokens) == (1234, 567)
    assert row.cost_usd == Decimal("0.0005253")
    assert row.outcome == "ok"
    assert row.api_key_id == api_key[1].pk
    sent = fake_upstream.requests[0]
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.headers["authorization"] == "Bearer sk-test"
    # No SDK telemetry: the upstream learns neither our OS nor our Python.
    assert not [h for h in sent.headers if h.startswith("x-stainless")]


def test_generate_gemini_success_charges_exact_cost_in_ledger(
    upstream_settings, fake_upstream, gemini_model, key_client
):
    fake_upstream.script(Behaviour(text="Bonjour.", usage=(2000, 1000)))

    response = _post(
        key_client,
        {
            "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Hello"},
            ],
            "model": "gemini-test",
        },
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["text"] == "Bonjour."
    assert body["cost_usd"] == "0.000600"  # 2000 x 0.10 / 1e6 + 1000 x 0.40 / 1e6
    assert UsageRecord.objects.get(request_id=body["request_id"]).cost_usd == Decimal("0.0006")
    sent = fake_upstream.requests[0]
    assert sent.path.endswith("/models/gemini-2.0-flash:generateContent")
    assert sent.body["systemInstruction"]["parts"][0]["text"] == "Answer in French."


def test_generate_second_identical_request_is_a_free_cache_hit(
    upstream_settings, fake_upstream, openai_model, key_client
):
    first = _post(key_client, {"prompt": "Same question", "model": "gpt-test"})
    second = _post(key_client, {"prompt": "Same question", "model": "gpt-test"})

    assert first.status_code == second.status_code == 200
    assert second["X-Cache"] == "HIT"
    body = second.json()
    assert body["cached"] is True
    assert body["cost_usd"] == "0"
    assert body["usage"]["total_tokens"] == 0
    assert body["text"] == first.json()["text"]
    assert len(fake_upstream.requests) == 1


def test_generate_cache_bypass_calls_upstream_each_time(
    upstream_settings, fake_upstream, openai_model, key_client
):
    for _ in range(2):
        response = _post(key_client, {"prompt": "Q", "model": "gpt-test", "cache": "bypass"})
        assert response["X-Cache"] == "BYPASS"
    assert len(fake_upstream.requests) == 2


def test_generate_retries_server_errors_then_succeeds(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.script(
        Behaviour(kind="status", status=500), Behaviour(kind="status", status=503), Behaviour()
    )

    response = _post(key_client, {"prompt": "retry me", "model": "gpt-test"})

    assert response.status_code == 200, response.content
    assert len(fake_upstream.requests) == 3
    assert UsageRecord.objects.filter(outcome="ok").count() == 1


def test_generate_gemini_retries_malformed_json_then_succeeds(
    upstream_settings, fake_upstream, gemini_model, key_client
):
    fake_upstream.script(Behaviour(kind="malformed"), Behaviour(text="fine"))

    response = _post(key_client, {"prompt": "hello", "model": "gemini-test"})

    assert response.status_code == 200, response.content
    assert response.json()["text"] == "fine"
    assert len(fake_upstream.requests) == 2


def test_generate_honours_retry_after_of_a_429(
    upstream_settings, fake_upstream, openai_model, key_client
):
    # Backoff is at most 0.05 s here, so only Retry-After explains a wait of a second.
    fake_upstream.script(Behaviour(kind="status", status=429, retry_after="1"), Behaviour())

    response = _post(key_client, {"prompt": "rate limited", "model": "gpt-test"})

    assert response.status_code == 200, response.content
    first, second = fake_upstream.requests
    assert second.at - first.at >= 1.0


def test_generate_429_with_retry_after_beyond_budget_is_503_not_retried(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 2.0
    fake_upstream.default = Behaviour(kind="status", status=429, retry_after="30")

    response = _post(key_client, {"prompt": "slow down", "model": "gpt-test"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert int(response["Retry-After"]) >= 30
    assert len(fake_upstream.requests) == 1
    assert UsageRecord.objects.get().outcome == "upstream_unavailable"


def test_generate_429_with_retry_after_as_http_date_beyond_budget_is_503_not_retried(
    upstream_settings, fake_upstream, openai_model, key_client
):
    # RFC 9110 lets Retry-After be an HTTP date: it is as binding as the seconds form.
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 2.0
    in_30_seconds = formatdate(time.time() + 30, usegmt=True)
    fake_upstream.default = Behaviour(kind="status", status=429, retry_after=in_30_seconds)

    response = _post(key_client, {"prompt": "slow down by date", "model": "gpt-test"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert int(response["Retry-After"]) >= 28  # the date has whole seconds
    assert len(fake_upstream.requests) == 1
    assert UsageRecord.objects.get().outcome == "upstream_unavailable"


@pytest.mark.parametrize("header", ["inf", "1e999", "nan"])
def test_generate_429_with_retry_after_beyond_any_number_is_503_never_500(
    upstream_settings, fake_upstream, openai_model, key_client, header
):
    fake_upstream.default = Behaviour(kind="status", status=429, retry_after=header)

    response = _post(key_client, {"prompt": "slow down forever", "model": "gpt-test"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert UsageRecord.objects.get().outcome == "upstream_unavailable"


def test_generate_timeout_is_504_and_refunded(
    upstream_settings, fake_upstream, openai_model, key_client, api_key
):
    from quotas.services import quota_standing
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    user = api_key[1].user
    UserQuotaFactory(user=user, plan=PlanFactory(tokens_per_minute=100_000, cost_per_day="5"))
    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.3
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="hang")

    response = _post(key_client, {"prompt": "never answered", "model": "gpt-test"})

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert row.outcome == "upstream_timeout"
    assert row.cost_usd == 0
    assert row.prompt_tokens == row.completion_tokens == 0
    standing = quota_standing(user_id=user.pk, key_id=api_key[1].pk)["limits"]
    assert standing["tokens_per_minute"]["used"] == 0
    assert Decimal(standing["cost_per_day"]["used"]) == 0


def test_generate_client_error_upstream_is_502_not_retried(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(kind="status", status=400)

    response = _post(key_client, {"prompt": "bad", "model": "gpt-test"})

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 1


def test_generate_idempotent_retry_returns_first_answer_charged_once(
    upstream_settings, fake_upstream, openai_model, key_client
):
    body = {"prompt": "pay once", "model": "gpt-test", "cache": "bypass"}
    fake_upstream.default = Behaviour(text="done", usage=(10, 10))

    first = _post(key_client, body, HTTP_IDEMPOTENCY_KEY="order-42")
    again = _post(key_client, body, HTTP_IDEMPOTENCY_KEY="order-42")

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert len(fake_upstream.requests) == 1
    assert UsageRecord.objects.count() == 1


def test_generate_idempotency_key_reused_with_other_body_is_409(
    upstream_settings, fake_upstream, openai_model, key_client
):
    _post(key_client, {"prompt": "one", "model": "gpt-test"}, HTTP_IDEMPOTENCY_KEY="k1")

    response = _post(key_client, {"prompt": "two", "model": "gpt-test"}, HTTP_IDEMPOTENCY_KEY="k1")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_conflict"


def test_generate_idempotent_retry_after_failure_runs_again(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(Behaviour(kind="status", status=500), Behaviour(text="second time"))
    body = {"prompt": "flaky", "model": "gpt-test"}

    failed = _post(key_client, body, HTTP_IDEMPOTENCY_KEY="k2")
    retried = _post(key_client, body, HTTP_IDEMPOTENCY_KEY="k2")

    assert failed.status_code == 502
    assert retried.status_code == 200
    assert retried.json()["text"] == "second time"


def test_generate_unknown_model_is_400(upstream_settings, key_client):
    response = _post(key_client, {"prompt": "hi", "model": "no-such-model"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [{"model": "gpt-test"}, {"prompt": "hi", "model": "no-such-model"}],
    ids=["no prompt", "unknown model"],
)
def test_repeated_refusals_cost_no_sql(
    upstream_settings, openai_model, key_client, body, django_assert_num_queries
):
    """A client stuck on a bad request, or a flood of them, does not reach the database:
    neither the refusal nor its rate-limit headers resolve a policy again."""
    assert _post(key_client, body).status_code == 400
    for _ in range(3):
        with django_assert_num_queries(0):
            response = _post(key_client, body)
        assert response.status_code == 400


def test_generate_model_not_allowed_by_plan_is_403(
    upstream_settings, openai_model, local_model, key_client, user
):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(user=user, plan=PlanFactory(allowed_models=["local/demo"]))

    response = _post(key_client, {"prompt": "hi", "model": "gpt-test"})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_generate_max_tokens_over_model_limit_is_400(upstream_settings, openai_model, key_client):
    response = _post(key_client, {"prompt": "hi", "model": "gpt-test", "max_tokens": 5000})

    assert response.status_code == 400
    assert "max_tokens" in response.json()["error"]["fields"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-test"},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "a", "temperature": 9},
        {"messages": [{"role": "wizard", "content": "b"}]},
        {"prompt": "a", "priority": "urgent"},
        {"prompt": ["not", "a", "string"]},
    ],
)
def test_generate_bad_body_is_400_invalid_request(upstream_settings, key_client, body):
    response = _post(key_client, body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": 123, "model": "gpt-test"}, "prompt"),
        ({"messages": [{"role": "user", "content": 7}], "model": "gpt-test"}, "messages"),
        ({"prompt": "a", "model": 5}, "model"),
    ],
)
def test_generate_text_that_is_not_a_string_is_400_naming_it(
    upstream_settings, openai_model, key_client, body, field
):
    # DRF's CharField would read 123 as "123" and answer it.
    response = _post(key_client, body)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert list(error["fields"]) == [field]
    assert "string" in str(error["fields"][field])


def test_generate_without_credentials_is_401(api_client):
    response = api_client.post(URL, {"prompt": "hi"}, format="json")

    assert response.status_code == 401


def test_generate_quota_exhausted_serves_stale_copy_as_fallback(
    upstream_settings, fake_upstream, openai_model, key_client, user
):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(user=user, plan=PlanFactory(requests_per_minute=1, allow_stale_fallback=True))
    fake_upstream.default = Behaviour(text="the answer")
    first = _post(key_client, {"prompt": "popular", "model": "gpt-test"})

    again = _post(key_client, {"prompt": "popular", "model": "gpt-test", "cache": "refresh"})

    assert first.status_code == 200
    assert again.status_code == 200, again.content
    assert again["X-Cache"] == "STALE"
    body = again.json()
    assert body["fallback"] is True
    assert body["text"] == "the answer"
    assert body["cost_usd"] == "0"
    assert len(fake_upstream.requests) == 1


def test_generate_quota_exhausted_without_fallback_is_429(
    upstream_settings, fake_upstream, openai_model, key_client, user
):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(user=user, plan=PlanFactory(requests_per_minute=1, allow_stale_fallback=False))
    _post(key_client, {"prompt": "popular", "model": "gpt-test"})

    again = _post(key_client, {"prompt": "popular", "model": "gpt-test", "cache": "refresh"})

    assert again.status_code == 429
    assert again.json()["error"]["code"] == "quota_exceeded"
    assert int(again["Retry-After"]) >= 1


def test_generate_local_provider_answers_offline_and_deterministically(
    upstream_settings, local_model, key_client
):
    body = {"prompt": "What is a gateway?", "model": "local/demo", "cache": "bypass"}

    first = _post(key_client, body).json()
    second = _post(key_client, body).json()

    assert first["text"] == second["text"]
    assert first["text"].startswith("[local offline model]")
    assert first["model"] == "local/demo"
    assert first["usage"]["completion_tokens"] > 0
    assert Decimal(first["cost_usd"]) > 0


def test_generate_local_provider_simulated_failures_are_refunded(
    upstream_settings, local_model, key_client
):
    upstream_settings.LOCAL_PROVIDER_FAILURE_RATE = 1.0
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2

    response = _post(key_client, {"prompt": "hi", "model": "local/demo"})

    assert response.status_code == 502
    assert UsageRecord.objects.get().outcome == "upstream_error"


def test_generate_openai_malformed_json_is_retried_then_502_refunded(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="malformed")

    response = _post(key_client, {"prompt": "garbled", "model": "gpt-test"})

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert row.outcome == "upstream_error"
    assert row.cost_usd == 0


@pytest.mark.parametrize(
    "body",
    [
        "123",  # JSON, but not an object
        "true",
        '{"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": 7}]}',
    ],
)
def test_generate_gemini_answer_of_unexpected_shape_is_retried_then_502_refunded(
    upstream_settings, fake_upstream, gemini_model, key_client, body
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="raw", body=body)

    response = _post(key_client, {"prompt": "odd", "model": "gemini-test"})

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)


@pytest.mark.usefixtures("openai_model", "gemini_model")
@pytest.mark.parametrize("model", ["gpt-test", "gemini-test"])
def test_generate_usage_report_of_negative_tokens_is_502_and_credits_nothing(
    upstream_settings, fake_upstream, key_client, api_key, model
):
    from quotas.services import quota_standing
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    user = api_key[1].user
    UserQuotaFactory(user=user, plan=PlanFactory(tokens_per_minute=100_000, cost_per_day="5"))
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(text="odd count", usage=(-700, 3))

    response = _post(key_client, {"prompt": "count", "model": model})

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.cost_usd) == ("upstream_error", 0, 0)
    standing = quota_standing(user_id=user.pk, key_id=api_key[1].pk)["limits"]
    assert standing["tokens_per_minute"]["used"] == 0
    assert Decimal(standing["cost_per_day"]["used"]) == 0


def test_generate_openai_usage_report_past_any_integer_is_502(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    answer = {"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": 1e400}}
    fake_upstream.default = Behaviour(kind="raw", body=json.dumps(answer))

    response = _post(key_client, {"prompt": "count", "model": "gpt-test"})

    assert response.status_code == 502, response.content
    assert UsageRecord.objects.get().outcome == "upstream_error"


def test_generate_openai_answer_broken_off_is_retried_then_502_refunded(
    upstream_settings, fake_upstream, openai_model, key_client
):
    # The provider was reached and began its answer: a bad gateway, not one unavailable.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="cut", text="a long answer " * 20)

    response = _post(key_client, {"prompt": "broken", "model": "gpt-test"})

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert row.outcome == "upstream_error"
    assert row.cost_usd == 0


def test_generate_gemini_answer_broken_off_is_502_and_refunded(
    upstream_settings, fake_upstream, gemini_model, key_client
):
    # google-genai reads the body itself: the headers had come, so the answer broke off.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="cut", text="a long answer " * 20)

    response = _post(key_client, {"prompt": "broken", "model": "gemini-test"})

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)


def test_generate_gemini_unreachable_stays_503_after_a_broken_answer(
    upstream_settings, fake_upstream, gemini_model, key_client
):
    # The mark of a begun answer is the call's own: a later call that cannot connect is
    # an unavailable provider again.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="cut", text="a long answer " * 20)
    assert _post(key_client, {"prompt": "one", "model": "gemini-test"}).status_code == 502
    fake_upstream.server.shutdown()
    fake_upstream.server.server_close()

    response = _post(key_client, {"prompt": "two", "model": "gemini-test"})

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_generate_gemini_hang_times_out_as_504(
    upstream_settings, fake_upstream, gemini_model, key_client
):
    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.3
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.default = Behaviour(kind="hang")

    response = _post(key_client, {"prompt": "silence", "model": "gemini-test"})

    assert response.status_code == 504
    assert len(fake_upstream.requests) == 2
    assert UsageRecord.objects.get().outcome == "upstream_timeout"


def test_generate_disabled_model_is_400(upstream_settings, openai_model, key_client):
    openai_model.enabled = False
    openai_model.save()

    response = _post(key_client, {"prompt": "hi", "model": "gpt-test"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_generate_model_outside_key_scopes_is_403(
    upstream_settings, openai_model, local_model, api_client, user
):
    from quotas.services import key_create

    full_key, _ = key_create(user=user, name="local only", scopes=["model:local/demo"])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")

    response = _post(api_client, {"prompt": "hi", "model": "gpt-test"})

    assert response.status_code == 403


def test_generate_cache_refresh_replaces_the_stored_answer(
    upstream_settings, fake_upstream, openai_model, key_client
):
    body = {"prompt": "news", "model": "gpt-test"}
    fake_upstream.default = Behaviour(text="old")
    _post(key_client, body)
    fake_upstream.default = Behaviour(text="new")

    refreshed = _post(key_client, {**body, "cache": "refresh"})
    later = _post(key_client, body)

    assert refreshed["X-Cache"] == "MISS"
    assert refreshed.json()["text"] == "new"
    assert later["X-Cache"] == "HIT"
    assert later.json()["text"] == "new"
    assert len(fake_upstream.requests) == 2


def test_client_reusing_its_request_id_is_charged_for_every_request_and_sees_it_as_sent(
    api_client, api_key, local_model, redis_conn
):
    from quotas.models import UsageRecord

    full, key = api_key
    for _ in range(2):
        response = api_client.post(
            "/api/v1/generate",
            {"prompt": "same id twice", "cache": "bypass"},
            format="json",
            HTTP_AUTHORIZATION=f"Bearer {full}",
            HTTP_X_REQUEST_ID="client-chosen-id",
        )
        assert response.status_code == 200, response.content
        assert response["X-Request-ID"] == "client-chosen-id"
        assert response.json()["request_id"] == "client-chosen-id"
    rows = UsageRecord.objects.filter(request_id__startswith="client-chosen-id.")
    assert rows.count() == 2
    assert all(row.cost_usd > 0 for row in rows)


def test_blank_prompt_is_invalid_request(api_client, api_key, local_model):
    full, _ = api_key
    response = api_client.post(
        "/api/v1/generate", {"prompt": "   "}, format="json", HTTP_AUTHORIZATION=f"Bearer {full}"
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["prompt"] == ["The prompt is empty."]


@pytest.mark.usefixtures("upstream_settings", "openai_model", "gemini_model")
@pytest.mark.parametrize("model", ["gpt-test", "gemini-test"])
def test_an_upstream_call_adds_no_log_line_of_the_http_client_at_info(
    fake_upstream, key_client, caplog, model
):
    # One structured line per request is the request log's; the SDKs' HTTP clients would
    # add an "HTTP Request: POST <upstream URL>" line of their own to every miss.
    caplog.set_level(logging.INFO)

    response = _post(key_client, {"prompt": "quiet please", "model": model})

    assert response.status_code == 200, response.content
    assert fake_upstream.requests, "the upstream was called"
    clients = {"httpx", "httpx2", "httpcore", "httpcore2", "openai", "google_genai"}
    assert [r.getMessage() for r in caplog.records if r.name.split(".")[0] in clients] == []


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        (URL, {"prompt": "word " * 80, "max_tokens": 16}, "prompt"),
        (
            URL,
            {"messages": [{"role": "user", "content": "word " * 80}], "max_tokens": 16},
            "messages",
        ),
        ("/api/v1/topics/subtopics", {"topic": "word " * 30}, "topic"),
    ],
)
def test_prompt_over_the_context_window_is_a_400_naming_the_field_sent(
    key_client, redis_conn, url, body, field
):
    from quotas.tests.factories import ModelPriceFactory

    ModelPriceFactory(model="local/tiny", context_window=64, max_output_tokens=32)

    response = key_client.post(url, {**body, "model": "local/tiny"}, format="json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert list(error["fields"]) == [field]
    assert "context window of 64 tokens" in error["message"]
    assert not UsageRecord.objects.exists()
