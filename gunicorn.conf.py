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
dropped. The project's hooks in config/gunicorn_hooks.py are called when present.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _hooks() -> ModuleType | None:
    try:
        return importlib.import_module("config.gunicorn_hooks")
    except ModuleNotFoundError as exc:
        if exc.name not in ("config.gunicorn_hooks", "config"):
            raise
        return None


def _call_hook(name: str, *args: Any) -> bool:
    hooks = _hooks()
    hook = getattr(hooks, name, None) if hooks is not None else None
    if hook is None:
        return False
    hook(*args)
    return True


def _multiproc_dir_clean() -> None:
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# Must be set before prometheus_client is first imported by a worker.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(Path(tempfile.gettempdir()) / "tollgate-prometheus")
)

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
    if not _call_hook("on_starting", server):
        _multiproc_dir_clean()


def when_ready(server: Any) -> None:
    _call_hook("when_ready", server)


def post_fork(server: Any, worker: Any) -> None:
    _call_hook("post_fork", server, worker)


def worker_exit(server: Any, worker: Any) -> None:
    _call_hook("worker_exit", server, worker)


def child_exit(server: Any, worker: Any) -> None:
    """Master: a dead worker's live gauges no longer count."""
    if not _call_hook("child_exit", server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
