"""Real servers for the tests: gunicorn with the project's gunicorn.conf.py on a free port."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_of(settings_dict: dict[str, Any]) -> str:
    host = settings_dict["HOST"] or "127.0.0.1"
    port = settings_dict["PORT"] or 5432
    return f"postgres://{settings_dict['USER']}@{host}:{port}/{settings_dict['NAME']}"


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextmanager
def gunicorn(
    tmp_path: Path, *, database_url: str, workers: int = 2, env: dict[str, str] | None = None
) -> Iterator[tuple[int, Path, subprocess.Popen, int]]:
    """Run `gunicorn config.wsgi:application` from the repository root (so it reads the
    repository's gunicorn.conf.py, as in production) until /health/live answers 200.

    Yields (port, Prometheus multiprocess directory, process, number of /health/live
    requests answered while waiting: they are counted in the metrics too).
    """
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir(exist_ok=True)
    port = free_port()
    full_env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": database_url,
        **(env or {}),
    }
    log_path = tmp_path / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "config.wsgi:application"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            answered = 0
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    status: int | None = http_request(port, "GET", "/health/live")[0]
                except OSError:
                    status = None
                if status is not None:
                    answered += 1
                if status == 200:
                    break
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
            yield port, metrics_dir, proc, answered
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
