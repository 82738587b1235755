"""The Gemini provider as an OpenAI SDK client sees it through /v1/chat/completions: Gemini's
finish reasons, usage report and refusals in OpenAI's terms, streamed or not."""

from __future__ import annotations

import pytest

from generation.tests.fake_upstream import Behaviour

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
