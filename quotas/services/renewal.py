"""Renewal of a running request's reservation on a thread of its own, for requests whose
length is not the gateway's to bound (streams).

A stream runs as long as its client reads it. One that stops reading leaves its worker's
thread blocked in send, where nothing of the request runs: a renewal made from there lapses
with it. The sweep would then take the stream for a dead worker's, refund its reservation
and free its concurrency slot while it still runs, and once the reservation record expired
(twice the lease's life) its settlement would find nothing to settle and Redis would never
count its cost. A thread of its own renews it instead, whatever the request's thread does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from django.conf import settings

from quotas.engine import BackendUnavailable
from quotas.services.admission import Admission
from quotas.services.settlement import usage_renew
from quotas.services.state import logger


class Renewal:
    """The renewal of one admission's reservation and leases every third of
    QUOTA_LEASE_TTL (counted from its admission) until `stop`, or until there is nothing
    left to renew (settled, swept, or lost with a restarted Redis): then `running` is False.

    A renewal that fails (Redis unreachable or refusing) is tried again a third of the
    lease later, and logged once per admission; it never raises. It runs on a daemon
    thread of its own (as `generation.job_lock.JobLock` does), one per open stream,
    whatever the worker class: a sync worker's one thread, each of a gthread worker's,
    hold one each at most. It dies with its process, whose reservations are then the
    sweep's, as a dead worker's should be.

    `keep_alive`, when given, is called after each renewal (unless it found nothing left to
    renew), on the same thread: whatever else must live exactly as long as the request (a
    stream's claim of its Idempotency-Key) is renewed with it. Its failures are logged as
    a renewal's are, and end nothing.
    """

    def __init__(
        self, admission: Admission, keep_alive: Callable[[], object] | None = None
    ) -> None:
        self.admission = admission
        self.keep_alive = keep_alive
        self._stop = threading.Event()
        self._complained = False
        self._thread = threading.Thread(
            target=self._renew_until_stopped,
            name=f"renewal-{admission.request_id[:16]}",
            daemon=True,
        )

    def start(self) -> Renewal:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No renewal starts after this, but one under way may still land (its script then
        finds nothing to renew once the request is settled). Idempotent, any thread, never
        waits: the request's thread calls it on its way out."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def _renew_until_stopped(self) -> None:
        every = settings.QUOTA_LEASE_TTL / 3
        wait = self.admission.started + every - time.monotonic()
        while not self._stop.wait(max(0.0, wait)):
            if not self._renew():
                self._stop.set()
                return
            if self.keep_alive is not None:
                try:
                    self.keep_alive()
                except Exception as exc:  # as a failed renewal: tried again at the next third
                    self._complain("keep-alive of %s failed: %r", exc, trace=True)
            wait = every

    def _renew(self) -> bool:
        """One renewal: False when there is nothing left to renew."""
        try:
            return usage_renew(admission=self.admission)
        except BackendUnavailable as exc:
            self._complain("lease of %s not renewed: quota backend unavailable (%s)", exc)
        except Exception as exc:  # a renewal must never end the renewals, nor the stream
            self._complain("lease of %s not renewed: %r", exc, trace=True)
        return True  # still ours, as far as anyone knows: tried again at the next third

    def _complain(self, message: str, exc: BaseException, *, trace: bool = False) -> None:
        # A long stream under a long outage would otherwise log every third of the lease.
        if self._complained:
            return
        self._complained = True
        logger.warning(message, self.admission.request_id, exc, exc_info=trace)


def renewal_start(
    *, admission: Admission, keep_alive: Callable[[], object] | None = None
) -> Renewal:
    """Keep `admission`'s reservation and concurrency leases held while its request runs,
    on a thread of its own, however long the request's thread is blocked, and call
    `keep_alive` at each renewal; see `Renewal`. The caller must `stop()` it when the
    request ends, settled or not."""
    return Renewal(admission, keep_alive).start()
