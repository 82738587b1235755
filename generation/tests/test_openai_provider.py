"""The OpenAI-compatible provider against the fake upstream: what it sends, where it sends
it, and what it makes of the answer. A non-streamed call is a POST built from the SDK's own
base URL and headers; these tests pin that the upstream sees what the SDK would send."""

from __future__ import annotations

import pytest

from generation.providers.base import CompletionRequest, ProviderRejected
from generation.providers.openai_compat import OpenAIProvider
from generation.tests.fake_upstream import Behaviour

REQUEST = CompletionRequest(
    model="gpt-4o-mini", messages=({"role": "user", "content": "Hi"},), max_tokens=20
)


def _provider(base_url: str) -> OpenAIProvider:
    return OpenAIProvider(api_key="sk-test", base_url=base_url, connect_timeout=1.0)


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_sends_the_sdks_headers_and_its_organisation_and_project(fake_upstream, no_proxy_env):
    no_proxy_env.setenv("OPENAI_ORG_ID", "org-tollgate")
    no_proxy_env.setenv("OPENAI_PROJECT_ID", "proj-7")
    fake_upstream.default = Behaviour(text="Hello", usage=(9, 2))

    completion = _provider(fake_upstream.openai_base_url).complete(REQUEST, timeout=2.0)

    assert (completion.text, completion.prompt_tokens, completion.completion_tokens) == (
        "Hello",
        9,
        2,
    )
    sent = fake_upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "gpt-4o-mini",
        "messages": [REQUEST.messages[0]],
        "max_tokens": 20,
    }
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["user-agent"].startswith("OpenAI/Python ")
    assert sent.headers["openai-organization"] == "org-tollgate"
    assert sent.headers["openai-project"] == "proj-7"
    assert not [h for h in sent.headers if h.startswith("x-stainless")]


def test_goes_through_the_proxy_the_environment_names(fake_upstream, no_proxy_env):
    # The upstream's own name does not resolve: only the proxy can have answered.
    no_proxy_env.setenv("HTTP_PROXY", fake_upstream.url)

    completion = _provider("http://upstream.invalid/v1").complete(REQUEST, timeout=2.0)

    assert completion.text
    assert fake_upstream.requests[0].path == "http://upstream.invalid/v1/chat/completions"


def test_leaves_out_the_proxy_for_a_host_in_no_proxy(fake_upstream, no_proxy_env):
    no_proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")

    completion = _provider(fake_upstream.openai_base_url).complete(REQUEST, timeout=2.0)

    assert completion.text
    assert fake_upstream.requests[0].path == "/v1/chat/completions"


def test_a_refusal_carries_the_upstreams_own_message(fake_upstream, no_proxy_env):
    fake_upstream.default = Behaviour(kind="status", status=400)

    with pytest.raises(ProviderRejected) as refused:
        _provider(fake_upstream.openai_base_url).complete(REQUEST, timeout=2.0)

    assert str(refused.value) == "openai: HTTP 400: fake 400"  # its error.message


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_bounds_the_answer_with_the_field_the_upstream_takes(fake_upstream, no_proxy_env, param):
    # OpenAI's reasoning models refuse max_tokens; some compatible servers know only it.
    provider = OpenAIProvider(
        api_key="sk-test",
        base_url=fake_upstream.openai_base_url,
        connect_timeout=1.0,
        max_tokens_param=param,
    )

    provider.complete(REQUEST, timeout=2.0)
    streamed = list(provider.stream(REQUEST, timeout=2.0))

    assert streamed
    for sent in fake_upstream.requests:
        other = "max_tokens" if param == "max_completion_tokens" else "max_completion_tokens"
        assert sent.body[param] == 20
        assert other not in sent.body
    assert len(fake_upstream.requests) == 2


def test_by_default_openais_own_api_gets_max_completion_tokens_and_others_max_tokens(
    no_proxy_env,
):
    no_proxy_env.delenv("OPENAI_BASE_URL", raising=False)

    assert _provider("").max_tokens_param == "max_completion_tokens"
    assert _provider("https://api.openai.com/v1").max_tokens_param == "max_completion_tokens"
    assert _provider("http://vllm.internal:8000/v1").max_tokens_param == "max_tokens"
