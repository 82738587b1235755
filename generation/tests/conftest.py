from __future__ import annotations

import time

import openai
import pytest

from generation.tests.fake_upstream import Behaviour, FakeUpstream


@pytest.fixture
def fake_upstream():
    """A real HTTP server on loopback speaking the OpenAI and Gemini wire formats."""
    server = FakeUpstream().start()
    yield server
    server.close()


@pytest.fixture
def upstream_settings(settings, fake_upstream, redis_conn):
    """Providers pointed at the fake upstream, with short timeouts and backoff so that the
    tests run quickly, and a clean Redis (breakers, counters, cache)."""
    from generation.providers import providers_reset
    from generation.resilience import _closed_until, _redis_away, _scripts

    settings.OPENAI_BASE_URL = fake_upstream.openai_base_url
    settings.OPENAI_API_KEY = "sk-test"
    settings.GEMINI_BASE_URL = fake_upstream.url
    settings.GEMINI_API_KEY = "gm-test"
    settings.UPSTREAM_READ_TIMEOUT = 1.0
    settings.UPSTREAM_CONNECT_TIMEOUT = 1.0
    settings.UPSTREAM_MAX_ATTEMPTS = 3
    settings.UPSTREAM_MAX_RETRY_SECONDS = 10.0
    settings.UPSTREAM_BACKOFF_BASE = 0.01
    settings.UPSTREAM_BACKOFF_MAX = 0.05
    settings.CIRCUIT_FAILURE_THRESHOLD = 5
    settings.CIRCUIT_RESET_SECONDS = 30.0
    providers_reset()
    _scripts.clear()
    _closed_until.clear()
    _redis_away.reset()
    yield settings
    providers_reset()


@pytest.fixture
def openai_model(db):
    from quotas.tests.factories import ModelPriceFactory

    return ModelPriceFactory(
        model="gpt-test",
        provider="openai",
        upstream_model="gpt-4o-mini",
        input_per_million="0.150000",
        output_per_million="0.600000",
        context_window=128000,
        max_output_tokens=4096,
    )


@pytest.fixture
def gemini_model(db):
    from quotas.tests.factories import ModelPriceFactory

    return ModelPriceFactory(
        model="gemini-test",
        provider="gemini",
        upstream_model="gemini-2.0-flash",
        input_per_million="0.100000",
        output_per_million="0.400000",
        context_window=1000000,
        max_output_tokens=8192,
    )


@pytest.fixture
def tollgate(live_server, api_key):
    """An unmodified OpenAI SDK client pointed at Tollgate with a Tollgate key."""
    full_key, _ = api_key
    return openai.OpenAI(api_key=full_key, base_url=f"{live_server.url}/v1", max_retries=0)


@pytest.fixture
def key_client(api_client, api_key):
    """An API client authenticated with the user's key (Bearer)."""
    full_key, _ = api_key
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
    return api_client


@pytest.fixture
def half_open_circuit(upstream_settings, fake_upstream):
    """The circuit of openai's gpt-4o-mini opened by one failure, then half-open: the next
    call to it is the probe. The fake upstream still answers 500 until told otherwise."""
    from generation.providers.base import CompletionRequest
    from generation.resilience import upstream_complete

    upstream_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    upstream_settings.CIRCUIT_RESET_SECONDS = 0.3
    fake_upstream.default = Behaviour(kind="status", status=500)
    request = CompletionRequest(
        model="gpt-4o-mini", messages=({"role": "user", "content": "x"},), max_tokens=5
    )
    with pytest.raises(Exception, match="provider returned an error"):
        upstream_complete(provider="openai", request=request)
    time.sleep(0.4)  # the open period ends
