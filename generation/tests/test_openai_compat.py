from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from generation.tests.fake_upstream import Behaviour
from generation.tokens import tokens_count, tokens_count_messages
from quotas.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def test_openai_sdk_completes_through_tollgate_and_is_charged(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="Hello from upstream", usage=(40, 20))

    completion = tollgate.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=50,
    )

    assert completion.choices[0].message.content == "Hello from upstream"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-test"
    assert completion.usage.prompt_tokens == 40
    assert completion.usage.completion_tokens == 20
    row = UsageRecord.objects.get()
    assert row.cost_usd == Decimal("0.000018")  # 40 x 0.15 / 1e6 + 20 x 0.60 / 1e6


def test_openai_sdk_with_local_model_gets_labelled_offline_answer(
    upstream_settings, local_model, tollgate
):
    completion = tollgate.chat.completions.create(
        model="local/demo", messages=[{"role": "user", "content": "What is Tollgate?"}]
    )

    assert completion.model == "local/demo"
    assert completion.choices[0].message.content.startswith("[local offline model]")


def test_openai_sdk_streams_chunks_and_usage(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    text = "one two three four five six seven eight nine ten eleven twelve"
    fake_upstream.default = Behaviour(text=text, usage=(5, 12))

    stream = tollgate.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 12
    assert UsageRecord.objects.get().completion_tokens == 12
    assert fake_upstream.requests[0].body["stream"] is True  # streamed upstream too
    assert not [h for h in fake_upstream.requests[0].headers if h.startswith("x-stainless")]


def test_openai_sdk_stream_of_a_gemini_model_is_settled_when_it_ends(
    upstream_settings, fake_upstream, gemini_model, tollgate
):
    fake_upstream.default = Behaviour(text="alpha beta gamma delta epsilon", usage=(8, 5))

    stream = tollgate.chat.completions.create(
        model="gemini-test",
        messages=[{"role": "user", "content": "letters"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "alpha beta gamma delta epsilon"
    )
    assert "streamGenerateContent" in fake_upstream.requests[0].path
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens) == (8, 5)
    assert row.cost_usd == Decimal("0.0000028")  # (8 x 0.10 + 5 x 0.40) / 1e6, exact


@pytest.mark.usefixtures("upstream_settings", "openai_model", "gemini_model")
@pytest.mark.parametrize("model", ["gpt-test", "gemini-test"])
def test_openai_sdk_stream_cut_upstream_ends_in_a_502_error_event_and_is_refunded(
    fake_upstream, tollgate, api_client, api_key, model
):
    fake_upstream.default = Behaviour(
        kind="cut", text=" ".join(f"w{i}" for i in range(40)), usage=(5, 40)
    )

    stream = tollgate.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "long"}], stream=True
    )
    received: list[str] = []

    def drain() -> None:
        received.extend(c.choices[0].delta.content or "" for c in stream if c.choices)

    with pytest.raises(openai.APIError) as info:
        drain()

    assert "".join(received).startswith("w0 w1 w2")
    # The provider answered, then broke off: a bad gateway, not a provider unavailable.
    assert info.value.body["code"] == "upstream_error"
    assert info.value.body["type"] == "server_error"
    assert info.value.body["request_id"] == stream.response.headers["X-Request-ID"]
    row = UsageRecord.objects.get()
    assert row.outcome == "upstream_error"
    assert row.cost_usd == 0
    quota = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    standing = quota.json()["limits"]
    assert standing["tokens_per_minute"]["used"] == 0
    assert standing["concurrency"]["used"] == 0
    assert Decimal(standing["cost_per_day"]["used"]) == 0


def _upstream_events(*events: dict) -> str:
    """A stream's body as an OpenAI-compatible upstream sends it: the chunks, then [DONE]."""
    chunks = [
        json.dumps({"id": "up", "object": "chat.completion.chunk", "model": "m", **e})
        for e in events
    ]
    return "".join(f"data: {c}\n\n" for c in [*chunks, "[DONE]"])


@pytest.mark.usefixtures("upstream_settings", "openai_model")
@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": 7}, (7, 0)),
        ({"prompt_tokens": 7, "completion_tokens": None, "total_tokens": 7}, (7, 0)),
        ({"total_tokens": 9}, None),  # no prompt count: both estimated
    ],
)
def test_openai_sdk_stream_whose_upstream_usage_report_is_partial_is_charged_as_unstreamed(
    fake_upstream, tollgate, key_client, usage, charged
):
    # As a non-streamed answer's partial report is read: a missing completion count is 0,
    # a report without the prompt's count is no report (estimated).
    ask = [{"role": "user", "content": "count for me"}]
    fake_upstream.default = Behaviour(
        kind="raw",
        body=_upstream_events(
            {"choices": [{"index": 0, "delta": {"content": "one two three"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ),
    )

    chunks = list(
        tollgate.chat.completions.create(
            model="gpt-test", messages=ask, stream=True, stream_options={"include_usage": True}
        )
    )

    expected = charged or (tokens_count_messages(ask), tokens_count("one two three"))
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == expected
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("ok", *expected)
    quota = key_client.get("/api/v1/quota")
    assert quota.json()["limits"]["tokens_per_minute"]["used"] == sum(expected)
    assert quota.json()["limits"]["concurrency"]["used"] == 0


@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_broken_by_an_unexpected_error_ends_in_an_error_event_refunded(
    fake_upstream, tollgate, key_client
):
    # A piece of text that is no text (a number): whatever fails once the stream has begun,
    # the client's stream ends as a cut one does, and the request is refunded and its
    # concurrency lease freed at once, not left to the sweep.
    fake_upstream.default = Behaviour(
        kind="raw",
        body=_upstream_events(
            {"choices": [{"index": 0, "delta": {"content": "first words "}}]},
            {"choices": [{"index": 0, "delta": {"content": 5}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ),
    )
    stream = tollgate.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}], stream=True
    )

    with pytest.raises(openai.APIError) as info:
        list(stream)

    assert info.value.body["type"] == "server_error"
    assert info.value.body["request_id"] == stream.response.headers["X-Request-ID"]
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)
    quota = key_client.get("/api/v1/quota")
    standing = quota.json()["limits"]
    assert standing["tokens_per_minute"]["used"] == 0
    assert standing["concurrency"]["used"] == 0


def test_openai_sdk_stream_failing_before_first_piece_gets_a_json_error(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)

    with pytest.raises(openai.APIStatusError) as info:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}], stream=True
        )

    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"
    assert UsageRecord.objects.get().cost_usd == 0


@pytest.mark.parametrize("sent", [None, "client-chosen-id"])
def test_openai_sdk_upstream_failure_body_quotes_the_request_id_of_its_header(
    upstream_settings, fake_upstream, openai_model, tollgate, sent
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)

    with pytest.raises(openai.APIStatusError) as info:
        tollgate.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Request-ID": sent} if sent else None,
        )

    assert info.value.status_code == 502
    header = info.value.response.headers["X-Request-ID"]
    assert header == (sent or header)
    assert info.value.body["request_id"] == header


def test_openai_sdk_second_stream_is_served_from_cache(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="cached words here", usage=(3, 3))
    ask = {"model": "gpt-test", "messages": [{"role": "user", "content": "again"}]}
    first = "".join(
        c.choices[0].delta.content or ""
        for c in tollgate.chat.completions.create(**ask, stream=True)
        if c.choices
    )

    response = tollgate.chat.completions.with_raw_response.create(**ask, stream=True)
    second = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)

    assert first == second == "cached words here"
    assert response.headers["X-Cache"] == "HIT"
    assert len(fake_upstream.requests) == 1


def test_openai_sdk_sees_unknown_model_as_openai_shaped_400(upstream_settings, tollgate):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])

    error = info.value.body
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["message"]


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("response_format", {"type": "json_object"}),
        ("stop", ["\n"]),
        ("seed", 7),
        ("top_p", 0.5),
        ("logprobs", True),
        ("verbosity", "low"),
        ("n", 2),
    ],
)
def test_openai_sdk_sees_a_parameter_the_gateway_would_drop_refused_by_name(
    upstream_settings, local_model, tollgate, param, value
):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo", messages=[{"role": "user", "content": "Hi"}], **{param: value}
        )

    error = info.value.body
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_request",
        param,
    )
    assert "Not supported" in error["message"]
    assert not UsageRecord.objects.exists()


def test_openai_sdk_parameters_that_change_nothing_are_accepted(
    upstream_settings, local_model, tollgate
):
    completion = tollgate.chat.completions.create(
        model="local/demo",
        messages=[{"role": "user", "content": "Hi"}],
        top_p=1,
        presence_penalty=0,
        response_format={"type": "text"},
        user="end-user-7",
        metadata={"team": "docs"},
        n=1,
        temperature=2,
        frequency_penalty=0,
        prompt_cache_key="docs-bot",
        prompt_cache_retention="24h",
        safety_identifier="user-hash-7",
        extra_body={"store": False},
    )
    assert completion.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo",
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"temprature": 0.2},
        )
    assert info.value.body["param"] == "temprature"
    assert "Unrecognized" in info.value.body["message"]


def test_openai_sdk_sees_upstream_timeout_as_504_and_is_not_charged(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    upstream_settings.UPSTREAM_READ_TIMEOUT = 0.3
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="hang")

    with pytest.raises(openai.APIStatusError) as info:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hi"}]
        )

    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"
    assert info.value.body["type"] == "server_error"
    assert UsageRecord.objects.get().cost_usd == 0


@pytest.mark.usefixtures("openai_model")
@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_sees_an_open_circuit_as_503_with_the_retry_after_of_api(
    upstream_settings, fake_upstream, tollgate, key_client, stream
):
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.InternalServerError):  # the failure that opens the circuit
        tollgate.chat.completions.create(model="gpt-test", messages=hi)

    with pytest.raises(openai.InternalServerError) as info:
        tollgate.chat.completions.create(model="gpt-test", messages=hi, stream=stream)
    api = key_client.post("/api/v1/generate", {"prompt": "Hi", "model": "gpt-test"}, format="json")

    assert info.value.status_code == api.status_code == 503
    assert info.value.code == api.json()["error"]["code"] == "upstream_unavailable"
    assert 1 <= int(info.value.response.headers["Retry-After"]) <= 30
    assert abs(int(info.value.response.headers["Retry-After"]) - int(api["Retry-After"])) <= 1
    assert len(fake_upstream.requests) == 1  # neither left Tollgate


def test_openai_sdk_with_bad_key_gets_401(live_server, upstream_settings, openai_model):
    client = openai.OpenAI(
        api_key="tg_abcdefgh_" + "x" * 40, base_url=f"{live_server.url}/v1", max_retries=0
    )

    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}]
        )

    assert info.value.body["type"] == "authentication_error"


@pytest.fixture
def catalogue(openai_model, local_model):
    """gpt-test and local/demo enabled, other/model enabled too, old/model disabled."""
    from quotas.tests.factories import ModelPriceFactory

    ModelPriceFactory(model="other/model")
    ModelPriceFactory(model="old/model", enabled=False)


def test_openai_sdk_lists_the_models_the_caller_may_use(catalogue, tollgate, user):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    assert sorted(m.id for m in tollgate.models.list()) == ["gpt-test", "local/demo", "other/model"]
    UserQuotaFactory(
        user=user,
        plan=PlanFactory(allowed_models=["gpt-test", "local/demo"], requests_per_minute=60),
    )

    listed = tollgate.models.with_raw_response.list()

    assert sorted(m.id for m in listed.parse()) == ["gpt-test", "local/demo"]
    assert {m.owned_by for m in listed.parse()} == {"openai", "local"}
    assert listed.headers["X-RateLimit-Limit-Requests"] == "60"  # as on every /v1/ response


def test_openai_sdk_lists_only_the_models_of_a_keys_model_scopes(catalogue, live_server, user):
    from quotas.services import key_create

    full_key, _ = key_create(user=user, name="scoped", scopes=["model:local/demo"])
    client = openai.OpenAI(api_key=full_key, base_url=f"{live_server.url}/v1", max_retries=0)

    assert [m.id for m in client.models.list()] == ["local/demo"]


def test_openai_sdk_retrieves_a_model_by_its_name_with_a_slash(catalogue, tollgate):
    model = tollgate.models.retrieve("local/demo")

    assert (model.id, model.object, model.owned_by) == ("local/demo", "model", "local")
    with pytest.raises(openai.NotFoundError) as missing:
        tollgate.models.retrieve("old/model")  # disabled
    assert missing.value.code == "model_not_found"
    assert missing.value.body["type"] == "not_found_error"


def test_models_need_a_valid_key(catalogue, live_server):
    client = openai.OpenAI(api_key="tg_nope_nope", base_url=f"{live_server.url}/v1", max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_openai_sdk_max_completion_tokens_bounds_the_answer_like_max_tokens(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="short", usage=(4, 1))

    completion = tollgate.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=7
    )

    assert completion.choices[0].message.content == "short"
    assert fake_upstream.requests[0].body["max_tokens"] == 7
    with pytest.raises(openai.BadRequestError) as over:
        tollgate.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "Hi"}],
            max_completion_tokens=10**6,
        )
    assert over.value.body["param"] == "max_completion_tokens"
    assert over.value.body["message"].startswith("max_completion_tokens is over")
    with pytest.raises(openai.BadRequestError) as both:
        tollgate.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            max_completion_tokens=7,
        )
    assert both.value.body["param"] == "max_tokens"
    assert "at the same time" in both.value.body["message"]
    assert len(fake_upstream.requests) == 1


def test_openai_sdk_stream_without_include_usage_has_no_usage_chunk(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="a b c d e f g h i j", usage=(3, 10))
    ask = {"model": "gpt-test", "messages": [{"role": "user", "content": "letters"}]}

    plain = list(tollgate.chat.completions.create(**ask, stream=True))
    counted = list(
        tollgate.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )

    assert all(c.choices and c.usage is None for c in plain)
    assert all("usage" not in c.model_dump(exclude_unset=True) for c in plain)
    assert plain[0].object == "chat.completion.chunk"
    assert plain[0].choices[0].delta.role == "assistant"
    *pieces, last = counted
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    # Every other chunk carries the field, null, as OpenAI's do.
    assert all(c.choices and "usage" in c.model_fields_set and c.usage is None for c in pieces)


def test_openai_sdk_stream_options_without_stream_is_refused_by_name(
    upstream_settings, local_model, tollgate
):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo",
            messages=[{"role": "user", "content": "Hi"}],
            stream_options={"include_usage": True},
        )

    assert info.value.body["param"] == "stream_options"
    assert "stream" in info.value.body["message"]
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize(
    ("flags", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": "false"}, "stream"),
        ({"stream": 1}, "stream"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({"stream": True, "stream_options": {"include_usage": 0}}, "stream_options.include_usage"),
    ],
    ids=str,
)
def test_chat_completions_stream_flag_not_a_json_boolean_is_refused_by_name(
    upstream_settings, local_model, key_client, flags, param
):
    response = key_client.post(
        "/v1/chat/completions",
        {"model": "local/demo", "messages": [{"role": "user", "content": "Hi"}], **flags},
        format="json",
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_request",
        param,
    )
    assert "Must be a boolean" in error["message"]
    assert not UsageRecord.objects.exists()


def test_chat_completions_null_stream_flags_are_taken_as_unset(
    upstream_settings, local_model, key_client
):
    ask = {"model": "local/demo", "messages": [{"role": "user", "content": "Hi"}]}

    plain = key_client.post("/v1/chat/completions", {**ask, "stream": None}, format="json")
    streamed = key_client.post(
        "/v1/chat/completions",
        {**ask, "stream": True, "stream_options": {"include_usage": None}},
        format="json",
    )

    assert plain.status_code == 200
    assert plain.json()["object"] == "chat.completion"
    assert streamed.status_code == 200
    events = b"".join(streamed.streaming_content).decode()
    assert '"usage":{' not in events  # no usage chunk: include_usage null is not true


def test_openai_sdk_text_content_parts_are_joined_and_roles_mapped(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="ok", usage=(6, 1))

    completion = tollgate.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}],
            },
        ],
    )

    assert completion.choices[0].message.content == "ok"
    assert fake_upstream.requests[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, you"},
    ]


def test_openai_sdk_message_names_reach_the_upstream_and_key_the_cache(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(text="ok", usage=(6, 1))

    def ask(name: str) -> None:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hi", "name": name}]
        )

    ask("alice")
    ask("bob")  # another speaker: another answer, not alice's from the cache

    assert [r.body["messages"] for r in fake_upstream.requests] == [
        [{"role": "user", "content": "Hi", "name": "alice"}],
        [{"role": "user", "content": "Hi", "name": "bob"}],
    ]


def test_openai_sdk_overlong_message_name_is_refused_naming_it(
    upstream_settings, openai_model, tollgate
):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hi", "name": "n" * 65}]
        )

    assert info.value.body["param"] == "messages.[0].name"
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
    ],
)
def test_openai_sdk_non_text_content_part_is_refused_naming_it(
    upstream_settings, local_model, tollgate, part, kind
):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo",
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]},
            ],
        )

    error = info.value.body
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    assert error["param"] == "messages.[1].content"
    assert f"Content part 1 is of type {kind}: only text parts" in error["message"]
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "function", "content": "42", "name": "answer"},
    ],
)
def test_openai_sdk_tool_and_function_roles_are_refused_naming_the_role(
    upstream_settings, local_model, tollgate, message
):
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo", messages=[{"role": "user", "content": "Hi"}, message]
        )

    assert info.value.body["param"] == "messages.[1].role"
    assert f"The {message['role']} role is not supported" in info.value.body["message"]


@pytest.mark.usefixtures("upstream_settings", "openai_model", "local_model")
def test_openai_sdk_raises_the_exception_class_of_each_status(tollgate, user):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(
        user=user,
        plan=PlanFactory(
            allowed_models=["local/demo"], requests_per_minute=1, allow_stale_fallback=False
        ),
    )
    hi = [{"role": "user", "content": "Hi"}]

    with pytest.raises(openai.PermissionDeniedError) as denied:
        tollgate.chat.completions.create(model="gpt-test", messages=hi)
    tollgate.chat.completions.create(model="local/demo", messages=hi)
    with pytest.raises(openai.RateLimitError) as limited:
        tollgate.chat.completions.create(model="local/demo", messages=hi)
    with pytest.raises(openai.NotFoundError) as missing:
        tollgate.embeddings.create(model="local/demo", input="Hi")

    for error, kind in [
        (denied, "permission_error"),
        (limited, "rate_limit_error"),
        (missing, "invalid_request_error"),
    ]:
        assert set(error.value.body) >= {"message", "type", "param", "code"}
        assert error.value.body["type"] == kind
    assert limited.value.code == "quota_exceeded"
    assert int(limited.value.response.headers["Retry-After"]) >= 1


def test_openai_sdk_sees_an_upstream_failure_as_an_internal_server_error(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)

    with pytest.raises(openai.InternalServerError) as info:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hi"}]
        )

    assert info.value.status_code == 502
    assert (info.value.body["type"], info.value.code) == ("server_error", "upstream_error")
    assert info.value.body["param"] is None


def _upstream_events(*events: object) -> str:
    """An OpenAI stream as the upstream sends it: one chunk per event, then [DONE]."""
    chunks = [
        json.dumps(
            {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", **event}
        )
        for event in events
    ]
    return "".join(f"data: {chunk}\n\n" for chunk in [*chunks, "[DONE]"])


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": None},
        {"prompt_tokens": 5, "completion_tokens": "two"},
        {"prompt_tokens": [5], "completion_tokens": 2},
    ],
    ids=str,
)
@pytest.mark.usefixtures("upstream_settings", "openai_model")
def test_openai_sdk_stream_whose_upstream_usage_cannot_be_read_ends_in_an_error_event(
    fake_upstream, tollgate, api_client, api_key, usage
):
    # The same usage report in a non-streamed answer is a 502, refunded: a stream that has
    # sent its text ends in the error event instead of breaking off with no ending at all.
    fake_upstream.default = Behaviour(
        kind="raw",
        body=_upstream_events(
            {"choices": [{"index": 0, "delta": {"content": "hello "}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ),
    )
    stream = tollgate.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    received: list[str] = []

    with pytest.raises(openai.APIError) as info:
        received.extend(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert "".join(received) == "hello "
    assert info.value.body["code"] == "upstream_error"
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)
    quota = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    assert quota.json()["limits"]["concurrency"]["used"] == 0


@pytest.mark.parametrize("usage", [{}, 7], ids=str)
def test_openai_sdk_stream_whose_upstream_usage_has_no_counts_is_charged_an_estimate(
    upstream_settings, fake_upstream, openai_model, tollgate, usage
):
    # As a non-streamed answer whose usage holds no counts: charged as if none was reported.
    fake_upstream.default = Behaviour(
        kind="raw",
        body=_upstream_events(
            {"choices": [{"index": 0, "delta": {"content": "hello there"}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ),
    )

    chunks = list(
        tollgate.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    assert chunks[-1].usage.completion_tokens == 2  # estimated: two words
    row = UsageRecord.objects.get()
    assert (row.outcome, row.completion_tokens) == ("ok", 2)


_PARTS = [{"type": "text", "text": "hi"}]


def test_openai_sdk_answer_whose_upstream_content_is_not_text_is_a_502_not_its_repr(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    # Some compatible servers answer with a list of content parts: not a text to pass on.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    answer = {
        "choices": [{"message": {"role": "assistant", "content": _PARTS}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    fake_upstream.default = Behaviour(kind="raw", body=json.dumps(answer))

    with pytest.raises(openai.InternalServerError) as info:
        tollgate.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Hi"}]
        )

    assert (info.value.status_code, info.value.code) == (502, "upstream_error")
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)


def test_openai_sdk_stream_whose_upstream_content_is_not_text_ends_in_an_error_event(
    upstream_settings, fake_upstream, openai_model, tollgate
):
    fake_upstream.default = Behaviour(
        kind="raw",
        body=_upstream_events(
            {"choices": [{"index": 0, "delta": {"content": "hello "}}]},
            {"choices": [{"index": 0, "delta": {"content": _PARTS}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ),
    )
    stream = tollgate.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    received: list[object] = []

    with pytest.raises(openai.APIError) as info:
        received.extend(c.choices[0].delta.content for c in stream if c.choices)

    assert received == ["", "hello "]  # the role chunk, then the text: no parts passed on
    assert info.value.body["code"] == "upstream_error"
    row = UsageRecord.objects.get()
    assert (row.outcome, row.cost_usd) == ("upstream_error", 0)


@pytest.mark.parametrize("temperature", [True, False])
def test_openai_sdk_temperature_sent_as_a_boolean_is_refused_by_name(
    upstream_settings, local_model, tollgate, key_client, temperature
):
    # DRF's FloatField reads true as 1.0 and false as 0.0: an answer at a temperature the
    # client never chose, where OpenAI refuses the type.
    with pytest.raises(openai.BadRequestError) as info:
        tollgate.chat.completions.create(
            model="local/demo",
            messages=[{"role": "user", "content": "Hi"}],
            temperature=temperature,
        )
    generate = key_client.post(
        "/api/v1/generate", {"prompt": "Hi", "temperature": temperature}, format="json"
    )

    assert (info.value.body["param"], info.value.body["code"]) == ("temperature", "invalid_request")
    assert "Must be a number" in info.value.body["message"]
    assert generate.status_code == 400
    assert generate.json()["error"]["fields"] == {"temperature": ["Must be a number."]}
    assert not UsageRecord.objects.exists()
