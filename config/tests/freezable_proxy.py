"""A loopback TCP proxy in front of a real server that can be frozen, for tests of a hung
PostgreSQL.

Frozen, it stops reading from either side and stops accepting: the kernel still completes
new connections (the listen backlog) and acknowledges what clients send (socket buffers),
and nothing answers, as when every process of a PostgreSQL cluster is stopped with SIGSTOP
(bench/outage.py's postgres-freeze drill). Thawed, it forwards what waited in the buffers
and accepts the connections that queued meanwhile, as the server would once resumed. The
shared PostgreSQL is never stopped: only the test's own connections go through the proxy.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import Any


class FreezableProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.frozen = threading.Event()
        self._closed = threading.Event()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._thread = threading.Thread(target=self._run, name="freezable-proxy", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        for sock in [self.listener, *self._peers]:
            sock.close()
        self._peers.clear()

    def __enter__(self) -> FreezableProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            while not self._closed.is_set():
                if self.frozen.is_set():  # nothing read, nothing accepted, nothing sent
                    self._closed.wait(0.02)
                    continue
                for key, _ in sel.select(0.02):
                    if self.frozen.is_set():
                        break
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self.listener:
                        self._accept(sel)
                    else:
                        self._forward(sel, sock)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        server = socket.create_connection(self.upstream, 5)
        for sock in (client, server):
            sock.setblocking(True)
            sel.register(sock, selectors.EVENT_READ)
        self._peers[client], self._peers[server] = server, client

    def _forward(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, peer):  # one side closed: close the pair
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(end)
            self._peers.pop(end, None)
            end.close()
