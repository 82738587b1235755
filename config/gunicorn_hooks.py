"""Gunicorn server hooks (called by gunicorn.conf.py).

Prometheus multiprocess mode: under gunicorn every worker is its own process, so each keeps
its metric values in files under PROMETHEUS_MULTIPROC_DIR and /metrics adds them up. The
directory must be set before prometheus_client is first imported (gunicorn.conf.py sets it
at import time, in the master, before any worker loads the application), emptied at every
start so that counters of a previous run are not added to this one (`on_starting`), and a
dead worker's live gauges must be dropped (`child_exit`).

A worker ready to serve (`post_worker_init`) loads every view and the clients of the
providers the catalogue uses now rather than on its first requests, then freezes what it
has loaded out of the cyclic garbage collector's reach: a worker holds some 220,000
objects of Django, DRF and the provider SDKs that live as long as it does, and without the
freeze each full collection walks them all (up to 125 ms on the benchmark machine of
2026-11-30, 15 ms with it; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(tempfile.gettempdir()) / "tollgate-prometheus"


def multiprocess_dir_prepare() -> Path:
    """Export PROMETHEUS_MULTIPROC_DIR (default: a temporary directory) and empty it."""
    path = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(DEFAULT_DIR)))
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def on_starting(server: Any) -> None:
    """Gunicorn hook (master, once): start from an empty metrics directory."""
    multiprocess_dir_prepare()


def child_exit(server: Any, worker: Any) -> None:
    """Gunicorn hook (master): drop the live gauges of a worker that exited."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: Any) -> None:
    """Gunicorn hook (worker, once, after loading the application): load the URLconf (every
    view) and the providers' clients (their SDKs), start writing the ledger rows a killed
    worker left in the spool, then freeze the objects loaded so far."""
    from django.db import connections
    from django.urls import get_resolver

    from generation.providers import providers_warm
    from health.metrics import REQUEST_SLOTS
    from quotas.services.ledger import ledger_spool_adopt

    get_resolver().url_patterns  # noqa: B018 - imports every view now
    if worker is not None:  # the requests this worker can hold at once (1 with sync)
        REQUEST_SLOTS.set(max(1, int(worker.cfg.threads)))
    ledger_spool_adopt()  # ledger rows a killed worker left in the spool
    try:
        providers_warm()
    except Exception:  # the database or a provider's settings: built on first use instead
        logger.warning("providers not loaded at start", exc_info=True)
    finally:
        connections.close_all()  # the request threads open their own
    gc.collect()  # what startup left as garbage is freed, not frozen
    gc.freeze()
