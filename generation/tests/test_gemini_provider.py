"""The Gemini provider as an OpenAI SDK client sees it through /v1/chat/completions: Gemini's
finish reasons, usage report and refusals in OpenAI's terms, streamed or not."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("upstream_settings", "gemini_model"),
]

HI = [{"role": "user", "content": "Hi"}]


def _ask(tollgate, *, stream, messages=HI):
    """(the answer's text, its finish reasons, its usage) as the SDK reads them."""
    if not stream:
        completion = tollgate.chat.completions.create(model="gemini-test", messages=messages)
        choice = completion.choices[0]
        return choice.message.content, [choice.finish_reason], completion.usage
    chunks = list(
        tollgate.chat.completions.create(
            model="gemini-test",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    return text, [f for f in finishes if f], chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("gemini", "openai"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
    ],
)
def test_gemini_finish_reason_reaches_the_sdk_in_openais_terms(
    fake_upstream, tollgate, gemini, openai, stream
):
    fake_upstream.default = Behaviour(text="a b c d", usage=(3, 4), finish=gemini)

    _, finishes, _ = _ask(tollgate, stream=stream)

    # A stop of Gemini's filters read as "stop" would pass a withheld answer for a whole one.
    assert finishes == [openai]


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_thinking_tokens_are_completion_tokens_and_charged(fake_upstream, tollgate, stream):
    # A thinking model (Gemini 2.5) reports its thoughts apart from the answer's tokens and
    # bills them as output; OpenAI counts reasoning tokens in completion_tokens too.
    fake_upstream.default = Behaviour(text="a b c d", usage=(30, 4), thoughts=500)

    _, _, usage = _ask(tollgate, stream=stream)

    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 504, 534)
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens) == (30, 504)
    assert row.cost_usd == Decimal("0.0002046")  # (30 x 0.10 + 504 x 0.40) / 1e6


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_answer_without_usage_metadata_is_charged_an_estimate(
    fake_upstream, tollgate, stream
):
    fake_upstream.default = Behaviour(text="one two three", usage_reported=False)

    text, finishes, usage = _ask(tollgate, stream=stream)

    assert (text, finishes) == ("one two three", ["stop"])
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row.cost_usd > 0


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_blocked_prompt_is_a_content_filter_answer_asked_once(
    upstream_settings, fake_upstream, tollgate, stream
):
    # Gemini answers a prompt its filters block with no candidate at all, the reason in
    # promptFeedback: the same prompt would be blocked again, and the provider is healthy.
    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    fake_upstream.script(Behaviour(blocked="PROHIBITED_CONTENT", usage=(12, 0)))

    text, finishes, usage = _ask(tollgate, stream=stream)

    assert (text, finishes) == ("", ["content_filter"])
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 0)
    assert len(fake_upstream.requests) == 1  # not retried
    row = UsageRecord.objects.get()
    assert (row.prompt_tokens, row.completion_tokens) == (12, 0)
    # The circuit of the model stays closed for everyone else.
    other = tollgate.chat.completions.create(
        model="gemini-test", messages=[{"role": "user", "content": "Other"}]
    )
    assert other.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body",
    [
        "",
        'data: {"modelVersion": "gemini-2.0-flash"}\n\n',
        'data: {"usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}\n\n',
    ],
)
def test_gemini_stream_without_an_answer_is_a_502_neither_charged_nor_cached(
    upstream_settings, fake_upstream, tollgate, body
):
    # No candidate and no blocked prompt: no answer, as a non-streamed call takes it, not
    # an empty one that would be charged and then served from the cache to everyone.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(Behaviour(kind="raw", body=body))

    with pytest.raises(openai.APIStatusError) as info:
        _ask(tollgate, stream=True)

    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.cost_usd) == ("upstream_error", 0, 0)
    fake_upstream.default = Behaviour(text="the real answer", usage=(3, 3))
    assert _ask(tollgate, stream=True)[0] == "the real answer"
    assert len(fake_upstream.requests) == 2  # asked again: nothing was cached


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_conversation_of_system_messages_only_is_answered(fake_upstream, tollgate, stream):
    # OpenAI answers a conversation of instructions alone; Gemini refuses a request without
    # contents, so the instructions are its one user turn.
    fake_upstream.default = Behaviour(text="Hello there", usage=(6, 2))
    messages = [
        {"role": "system", "content": "Greet the reader."},
        {"role": "developer", "content": "In English."},
    ]

    text, finishes, _ = _ask(tollgate, stream=stream, messages=messages)

    assert (text, finishes) == ("Hello there", ["stop"])
    sent = fake_upstream.requests[-1].body
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "Greet the reader.\nIn English."}]}
    ]
    assert "systemInstruction" not in sent
    assert len(fake_upstream.requests) == 1


def test_gemini_system_messages_are_its_system_instruction(fake_upstream, tollgate):
    fake_upstream.default = Behaviour(text="Bonjour", usage=(6, 2))

    tollgate.chat.completions.create(
        model="gemini-test",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "And goodbye?"},
        ],
    )

    sent = fake_upstream.requests[0].body
    assert sent["systemInstruction"]["parts"] == [{"text": "Answer in French.\nBe brief."}]
    assert [(c["role"], c["parts"][0]["text"]) for c in sent["contents"]] == [
        ("user", "Hello"),
        ("model", "Bonjour"),
        ("user", "And goodbye?"),
    ]
