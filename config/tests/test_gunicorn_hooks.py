"""A gunicorn worker's start: what it loads and what it puts out of the collector's reach."""

from __future__ import annotations

import gc
import logging
import socket
import sys

import pytest

from config import gunicorn_hooks
from generation import providers
from quotas.tests.factories import ModelPriceFactory


@pytest.fixture
def fresh_start():
    providers.providers_reset()
    yield
    gc.unfreeze()
    providers.providers_reset()


@pytest.mark.django_db
def test_a_ready_worker_has_its_views_and_providers_loaded_and_its_startup_heap_frozen(
    fresh_start,
):
    ModelPriceFactory(model="gpt-live", provider="openai", upstream_model="gpt-4o-mini")
    ModelPriceFactory(model="local/demo", provider="local")
    ModelPriceFactory(model="gemini-off", provider="gemini", enabled=False)

    gunicorn_hooks.post_worker_init(worker=None)

    assert "generation.views" in sys.modules  # loaded before the first request
    # The clients of the providers enabled models use; not those of a disabled one.
    assert sorted(providers._providers) == ["local", "openai"]
    frozen = gc.get_freeze_count()
    assert frozen > 100_000  # Django, DRF, the SDKs: the application as loaded
    # A full collection now walks only what was allocated since.
    assert len(gc.get_objects()) < frozen / 10


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_cannot_reach_the_database_at_start_serves_once_it_is_back(
    fresh_start, local_model, api_key, api_client, caplog
):
    from django.db import connection

    real = dict(connection.settings_dict)
    connection.close()
    with socket.socket() as closed:  # a port nothing listens on: connections are refused
        closed.bind(("127.0.0.1", 0))
        connection.settings_dict.update(HOST="127.0.0.1", PORT=str(closed.getsockname()[1]))
        try:
            with caplog.at_level(logging.WARNING, logger="config.gunicorn_hooks"):
                gunicorn_hooks.post_worker_init(worker=None)
        finally:
            connection.close()
            connection.settings_dict.clear()
            connection.settings_dict.update(real)

    # The worker started: it said why its providers wait, and froze what it had loaded.
    assert "providers not loaded at start" in caplog.text
    assert providers._providers == {}
    assert gc.get_freeze_count() > 100_000
    # The database back, the first request builds the provider it needs.
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    response = api_client.post("/api/v1/generate", {"prompt": "hello"}, format="json")
    assert response.status_code == 200, response.content
    assert sorted(providers._providers) == ["local"]
