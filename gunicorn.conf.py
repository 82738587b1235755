"""Gunicorn configuration of Tollgate, read automatically from the working directory:

    gunicorn config.wsgi

Every value comes from the environment:
    WEB_CONCURRENCY           workers (default: 2 per core, at most 8)
    GUNICORN_WORKER_CLASS     gthread (default) | sync | ...
    GUNICORN_THREADS          threads per worker (default 4; 1 with sync)
    GUNICORN_BIND             default 0.0.0.0:$PORT (PORT default 8000)
    GUNICORN_TIMEOUT          a worker silent this long is killed (default 60 s)
    GUNICORN_GRACEFUL_TIMEOUT in-flight requests get this long after SIGTERM (default 30 s)
    GUNICORN_KEEPALIVE, GUNICORN_MAX_REQUESTS, GUNICORN_MAX_REQUESTS_JITTER,
    GUNICORN_ACCESS_LOG ("-" for stdout; default off: the application logs each request),
    GUNICORN_LOG_LEVEL, FORWARDED_ALLOW_IPS
    PROMETHEUS_MULTIPROC_DIR  metrics of all workers (default: a temporary directory)

Threads by default: a generation request waits seconds, sometimes minutes, on the model
provider. A sync worker holds one such request at a time, and gunicorn kills it when one
request outlasts GUNICORN_TIMEOUT (a long completion or stream is cut off, its reservation
left to the sweep); a gthread worker keeps answering the arbiter's heartbeat while its
threads wait, so the timeout only catches a worker that is really stuck. Each thread may
hold a database connection: size PostgreSQL (or PgBouncer) for workers x threads x
replicas. At zero upstream latency a sync worker costs less CPU per request
(docs/BENCHMARKS.md); GUNICORN_WORKER_CLASS=sync brings it back.

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
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gthread")
# gunicorn turns a sync worker with more than one thread into gthread: sync means one.
threads = _int("GUNICORN_THREADS", 1 if worker_class == "sync" else 4)
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


def post_worker_init(worker: Any) -> None:
    """Worker, once loaded: every view and the catalogue's providers loaded, then the
    startup heap frozen out of the cyclic GC."""
    gunicorn_hooks.post_worker_init(worker)
