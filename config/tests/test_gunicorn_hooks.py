"""A gunicorn worker's start: what it loads and what it puts out of the collector's reach."""

from __future__ import annotations

import gc
import sys

from config import gunicorn_hooks


def test_a_ready_worker_has_every_view_loaded_and_its_startup_heap_frozen():
    try:
        gunicorn_hooks.post_worker_init(worker=None)

        assert "generation.views" in sys.modules  # loaded before the first request
        frozen = gc.get_freeze_count()
        assert frozen > 100_000  # Django, DRF, the SDKs: the application as loaded
        # A full collection now walks only what was allocated since.
        assert len(gc.get_objects()) < frozen / 10
    finally:
        gc.unfreeze()
