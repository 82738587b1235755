"""PostgreSQL whose per-request connection health check costs no round trip.

Django's CONN_HEALTH_CHECKS runs `SELECT 1` before the first query of every request that
reuses a persistent connection: a round trip on the hot path (the ledger INSERT of every
cache miss). A server that closes a connection (restart, pg_terminate_backend, an idle
reaper) sends its farewell and a FIN, so the socket of a dead connection is readable while
that of a healthy idle one is not. Here the check looks at the socket without waiting and
runs Django's `SELECT 1` only when something is there. A connection lost without a word
(a network partition) is found by the first query, as it would be by `SELECT 1`; Django
closes an errored connection at the end of the request, and the ledger INSERT retries once
on a new one (quotas.services.ledger).

Every query, commit and rollback goes through config/db/deadline.py, which gives those of
the request path a read deadline: a server that hangs is then met like one that is stopped.

The parent is django-prometheus's PostgreSQL wrapper (query metrics) or, with
PROMETHEUS_DB_CACHE_METRICS=0, Django's own: settings.DATABASE_ENGINE_BASE names it.
"""

from __future__ import annotations

import select
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from config.db import deadline

_Base: Any = import_string(f"{settings.DATABASE_ENGINE_BASE}.base.DatabaseWrapper")


class DatabaseWrapper(_Base):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline_socket: tuple[int, int] | None = None
        self.execute_wrappers.append(deadline.execute_with_deadline)

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        connection = deadline.connecting(self, super().get_new_connection, conn_params)
        self.deadline_socket = deadline.socket_identity(connection)
        return connection

    # The round trips that do not go through a cursor's execute.
    def _commit(self) -> None:
        deadline.guarded(self, super()._commit)

    def _rollback(self) -> None:
        deadline.guarded(self, super()._rollback)

    def init_connection_state(self) -> None:
        deadline.guarded(self, super().init_connection_state)

    def is_usable(self) -> bool:
        try:
            return bool(deadline.guarded(self, super().is_usable))
        except deadline.DatabaseNotAnswering:  # held: not asked, as good as unusable
            return False

    def close_if_health_check_failed(self) -> None:
        if self.connection is not None and not self.errors_occurred and self._quiet():
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def _quiet(self) -> bool:
        """True if the server has sent nothing on this idle connection (so it has not
        closed it); anything pending means a real check is due."""
        if self.connection.closed:
            return False
        try:
            readable, _, _ = select.select([self.connection.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable
