"""Gunicorn server hooks for Prometheus multiprocess mode (called by gunicorn.conf.py).

Under gunicorn every worker is its own process, so each keeps its metric values in files
under PROMETHEUS_MULTIPROC_DIR and /metrics adds them up. The directory must be set before
prometheus_client is first imported (gunicorn.conf.py sets it at import time, in the master,
before any worker loads the application), emptied at every start so that counters of a
previous run are not added to this one (`on_starting`), and a dead worker's live gauges
must be dropped (`child_exit`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
