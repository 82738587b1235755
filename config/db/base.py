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

The parent is django-prometheus's PostgreSQL wrapper (query metrics) or, with
PROMETHEUS_DB_CACHE_METRICS=0, Django's own: settings.DATABASE_ENGINE_BASE names it.
"""

from __future__ import annotations

import select
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

_Base: Any = import_string(f"{settings.DATABASE_ENGINE_BASE}.base.DatabaseWrapper")


class DatabaseWrapper(_Base):  # type: ignore[misc]
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
