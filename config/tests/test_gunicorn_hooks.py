"""A gunicorn worker's start: what it loads and what it puts out of the collector's reach."""

from __future__ import annotations

import gc
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
