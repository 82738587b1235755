"""A private redis-server on a free loopback port, for tests that really stop Redis.

The shared Redis on 6379 is used by every other test run on the machine and must never be
stopped; a test that needs Redis to go away starts one of these, points REDIS_URL and the
Django cache at it, and stops and starts it at will.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server process without persistence; `start()` again after `stop()` gives an
    empty server on the same port, as a restarted Redis without persistence would be (and
    after `stop_keeping_data()`, the data it had)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tollgate-redis-")
        weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers, as with a
        hung Redis or a network partition; clients run into their socket timeouts."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop_keeping_data(self) -> None:
        """Stop the server after it saved its data set, which `start()` loads again: a
        Redis that went away for a while, or a network partition, and came back whole."""
        assert self.proc is not None
        with socket.create_connection(("127.0.0.1", self.port), 1) as conn:
            conn.sendall(b"SHUTDOWN SAVE\r\n")
            conn.recv(64)  # the server closes the connection once saved
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def point_settings_at(settings: Any, server: Any) -> None:
    """Point REDIS_URL and the default Django cache (pytest-django `settings`) at `server`
    (a PrivateRedis, or anything with the `url` of a Redis), with short socket timeouts so
    that a stopped or hung server is noticed quickly."""
    settings.REDIS_URL = server.url
    settings.CACHES = {
        **settings.CACHES,
        "default": {
            **settings.CACHES["default"],
            "LOCATION": server.url,
            "OPTIONS": {
                **settings.CACHES["default"].get("OPTIONS", {}),
                "SOCKET_CONNECT_TIMEOUT": 0.2,
                "SOCKET_TIMEOUT": 0.2,
            },
        },
    }
