"""Gunicorn configuration of Tollgate, read automatically from the working directory:

    gunicorn config.wsgi

Every value comes from the environment:
    WEB_CONCURRENCY           workers (default: 2 per core, at most 8)
    GUNICORN_WORKER_CLASS     sync (default) | gthread | ...
    GUNICORN_THREADS          threads per worker for gthread (default 1)
    GUNICORN_BIND             default 0.0.0.0:$PORT (PORT default 8000)
    GUNICORN_TIMEOUT          a worker silent this long is killed (default 60 s)
    GUNICORN_GRACEFUL_TIMEOUT in-flight requests get this long after SIGTERM (default 30 s)
    GUNICORN_KEEPALIVE, GUNICORN_MAX_REQUESTS, GUNICORN_MAX_REQUESTS_JITTER,
    GUNICORN_ACCESS_LOG ("-" for stdout; default off: the application logs each request),
    GUNICORN_LOG_LEVEL, FORWARDED_ALLOW_IPS
    PROMETHEUS_MULTIPROC_DIR  metrics of all workers (default: a temporary directory)

Prometheus multiprocess mode: the directory is set before any worker imports
prometheus_client, emptied when the master starts, and a dead worker's live gauges are
dropped, by the hooks of config/gunicorn_hooks.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# The hooks live with the project's code (the master imports this file before Django).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from config import gunicorn_hooks  # noqa: E402


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# Must be set before prometheus_client is first imported by a worker.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(gunicorn_hooks.DEFAULT_DIR))

bind = os.environ.get("GUNICORN_BIND", f"0.0.0.0:{_int('PORT', 8000)}")
workers = _int("WEB_CONCURRENCY", min(2 * (os.cpu_count() or 1), 8))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
threads = _int("GUNICORN_THREADS", 1)
timeout = _int("GUNICORN_TIMEOUT", 60)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)
max_requests = _int("GUNICORN_MAX_REQUESTS", 0)
max_requests_jitter = _int("GUNICORN_MAX_REQUESTS_JITTER", 0)
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# Heartbeat files in memory: the container's root filesystem is read-only.
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
)
proc_name = "tollgate"


def on_starting(server: Any) -> None:
    """Master, once: start from an empty metrics directory."""
    gunicorn_hooks.on_starting(server)


def child_exit(server: Any, worker: Any) -> None:
    """Master: a dead worker's live gauges no longer count."""
    gunicorn_hooks.child_exit(server, worker)
