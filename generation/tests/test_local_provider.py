from __future__ import annotations

import pytest

from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderServerError,
    ProviderTimeout,
)
from generation.providers.local import LocalProvider
from generation.tokens import tokens_count
from generation.topics import subtopics_messages, subtopics_parse


def _request(text: str = "Tell me about gateways", **kwargs) -> CompletionRequest:
    return CompletionRequest(
        model="demo", messages=({"role": "user", "content": text},), max_tokens=200, **kwargs
    )


def test_local_provider_same_input_same_answer(settings):
    provider = LocalProvider()

    first = provider.complete(_request(), timeout=1)
    again = provider.complete(_request(), timeout=1)

    assert first == again
    assert first.completion_tokens == tokens_count(first.text)
    assert first.usage_reported is False


def test_local_provider_cuts_answer_at_max_tokens(settings):
    request = CompletionRequest(
        model="demo", messages=({"role": "user", "content": "hi " * 50},), max_tokens=5
    )

    answer = LocalProvider().complete(request, timeout=1)

    assert answer.completion_tokens <= 5
    assert answer.finish_reason == "length"


def test_local_provider_subtopics_are_readable_json(settings):
    messages = subtopics_messages(topic="Rust", count=5)
    request = CompletionRequest(
        model="demo", messages=tuple(messages), max_tokens=500, task="subtopics"
    )

    answer = LocalProvider().complete(request, timeout=1)

    labels = subtopics_parse(answer.text, count=5)
    assert len(labels) == 5
    assert all(label.startswith("Rust") for label in labels)


def test_local_provider_simulates_failures_from_settings(settings):
    settings.LOCAL_PROVIDER_FAILURE_RATE = 1.0

    with pytest.raises(ProviderServerError):
        LocalProvider().complete(_request(), timeout=1)


def test_local_provider_simulates_timeouts_from_settings(settings):
    settings.LOCAL_PROVIDER_TIMEOUT_RATE = 1.0
    settings.LOCAL_PROVIDER_LATENCY_MS = 1

    with pytest.raises(ProviderTimeout):
        LocalProvider().complete(_request(), timeout=0.01)


def test_local_provider_stream_ends_with_the_whole_completion(settings):
    pieces = list(LocalProvider().stream(_request(), timeout=1))

    *texts, final = pieces
    assert isinstance(final, Completion)
    assert "".join(texts) == final.text
