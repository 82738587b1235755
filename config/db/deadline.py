"""A read deadline for PostgreSQL queries on the request path.

A server that hangs behind a live kernel (its processes stopped, a host stalled in swap, a
VM paused) accepts connections and acknowledges data, and answers nothing. A query sent on
an open connection then waits as long as the hang lasts: libpq has no read timeout,
`tcp_user_timeout` needs data the peer's kernel does not acknowledge, `lock_timeout` and
`statement_timeout` need a server that runs. Every request thread of a worker ends up
waiting on it and nothing is served, though the keys read a moment ago and the ledger spool
would let generation go on, as they do while the server is stopped.

So a query run on the request path (a commit, a rollback and a new connection's setup too)
gets `settings.DATABASE_READ_TIMEOUT` seconds. One watchdog thread per process looks at
the queries under way every tenth of a second; it shuts down (`shutdown(2)`) the socket of
one past its deadline, through a duplicate of psycopg's file descriptor so that the
descriptor stays psycopg's to close. psycopg's wait returns, the query fails with
`DatabaseNotAnswering` (an OperationalError), the connection is closed, and what handles a
stopped server takes over: keys read lately are still accepted, ledger rows are spooled,
anything else is a 503.

A query cut this way may still run if the server resumes: its bytes were in the server's
socket buffer. As with any connection lost mid-query, whether a write took effect is not
known; the ledger's INSERT is keyed on the request id (ON CONFLICT DO NOTHING), so the
spooled copy written later does not double it.

A stopped server refuses at once; a hung one would cost each query its whole deadline. So
once a deadline has passed, the process holds the database: queries with a deadline, and
new connections, fail at once with DatabaseNotAnswering. A check, from a thread of its own
started with the hold, asks the server again on a new connection (`SELECT 1`) a second
later, and every second while it gets no answer; its answer ends the hold, its deadline
renews it. No request waits out the deadline of a server still hung, only the requests in
flight when it hung, and none is failed once the server answers again: the check has asked
before they come. A new connection's startup is bounded by libpq's connect_timeout (the
kernel completes the handshake of a hung server, the startup packet gets no answer), and
its timeout holds the database too.

Where a deadline applies: from Django's request_started to its request_finished on the
request's thread (a streamed answer included), and within `read_deadline(seconds)`
anywhere (the ledger's flusher, the readiness probe). Management commands, migrations,
Celery tasks and the shell have none: their long queries (roll-ups, reports) are theirs to
wait for. A view whose queries legitimately take longer lifts it with
`read_deadline(None)`.

Cost: off the request path, one ContextVar read per query; on it, about a microsecond or
two (a small object, a set's add and a locked discard, a clock read; bench/db_deadline.py,
docs/BENCHMARKS.md), against a round trip of a hundred. No thread is started per query.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from django.conf import settings
from django.db import OperationalError
from psycopg.errors import ConnectionTimeout

T = TypeVar("T")

# The watchdog's period: a query fails between its deadline and this much later.
TICK_SECONDS = 0.1

# Seconds a query may wait for the database's answer in this context; 0: no deadline.
_seconds: contextvars.ContextVar[float] = contextvars.ContextVar(
    "tollgate_database_read_deadline", default=0.0
)


class DatabaseNotAnswering(OperationalError):
    """The database did not answer a query within its read deadline (the connection it was
    sent on is closed), or did not lately and is not asked again yet."""


class _Armed:
    """A query under way with a deadline: the socket it waits on, and whether the watchdog
    shut it down."""

    __slots__ = ("deadline", "fd", "fired", "inode")

    def __init__(self, deadline: float, fd: int, inode: int) -> None:
        self.deadline, self.fd, self.inode, self.fired = deadline, fd, inode, False


_armed: set[_Armed] = set()
# Held while a query is disarmed and while the watchdog looks for queries past their
# deadline: once its query is disarmed, the watchdog never shuts the socket down (it may
# be idle and healthy, or closed and its number given to another file).
_lock = threading.Lock()
_watchdog: threading.Thread | None = None

# While a database is taken for hung (a query of this process got no answer within its
# deadline), the queries with a deadline fail at once, as they would against a stopped
# server, instead of each waiting out its own deadline, until the check's thread, which
# asks the server again HOLD_SECONDS after the last time it did not answer, gets an answer.
# Queries without a deadline are not held.
HOLD_SECONDS = 1.0
_hung: dict[str, float] = {}  # alias: time.monotonic() at which the check asks it again
_checkers: dict[str, threading.Thread] = {}  # alias: the thread that asks it again
# True in a check's thread: the hold lets its queries through.
_checking: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tollgate_database_check", default=False
)


@contextlib.contextmanager
def read_deadline(seconds: float | None) -> Iterator[None]:
    """Give each query run inside the block `seconds` to be answered (None or 0: no
    deadline, e.g. for a view whose queries are known to take long)."""
    token = _seconds.set(seconds or 0.0)
    try:
        yield
    finally:
        _seconds.reset(token)


@contextlib.contextmanager
def deadline_at_most(seconds: float) -> Iterator[None]:
    """Within the block, a query that has a deadline gets at most `seconds` (0: as it
    was); where none applies (a command, a Celery task), none is set."""
    current = _seconds.get()
    if not current or not seconds or current <= seconds:
        yield
        return
    token = _seconds.set(seconds)
    try:
        yield
    finally:
        _seconds.reset(token)


def request_started(**_: Any) -> None:
    """Django's request_started: the request's queries get DATABASE_READ_TIMEOUT."""
    _seconds.set(settings.DATABASE_READ_TIMEOUT)


def request_finished(**_: Any) -> None:
    """Django's request_finished: the thread's next queries (outside a request) get none."""
    _seconds.set(0.0)


def execute_with_deadline(
    execute: Callable[..., T], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> T:
    """Django execute wrapper (connection.execute_wrappers) of every PostgreSQL connection."""
    seconds = _seconds.get()
    if not seconds:
        return execute(sql, params, many, context)
    return _run(seconds, context["connection"], execute, sql, params, many, context)


def guarded(db: Any, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, a round trip on `db`'s connection (a Django DatabaseWrapper), failed
    with DatabaseNotAnswering if no answer comes within the context's deadline."""
    seconds = _seconds.get()
    if not seconds:
        return call(*args)
    return _run(seconds, db, call, *args)


def _run(seconds: float, db: Any, call: Callable[..., T], *args: Any) -> T:
    if _hung:
        _admit(db.alias, seconds)
    sock = db.deadline_socket
    if sock is None or db.connection is None:
        return call(*args)
    armed = _Armed(time.monotonic() + seconds, *sock)
    _armed.add(armed)  # atomic; only taking it out needs the lock
    if _watchdog is None:
        _watchdog_start()
    try:
        result = call(*args)
    except Exception as exc:
        if armed.fired:
            _hold(db.alias, seconds)
            # libpq has closed the socket; Django lets the connection go now rather than at
            # the end of the request, so that a later query meets the hold, not a closed
            # connection (which the ledger would retry).
            with contextlib.suppress(Exception):
                db.close()
            raise DatabaseNotAnswering(
                f"the database did not answer within {seconds:g} s (DATABASE_READ_TIMEOUT_MS,"
                " LEDGER_WRITE_TIMEOUT_MS for a ledger row)"
            ) from exc
        if _hung:
            _hung.pop(db.alias, None)  # an error, but an answer: the server runs
        raise
    finally:
        with _lock:
            _armed.discard(armed)
    if armed.fired:
        # The answer came as the watchdog shut the socket down: the result stands, the
        # connection is dead, and Django closes it at the end of the request.
        db.errors_occurred = True
    elif _hung:
        _hung.pop(db.alias, None)
    return result


def connecting(db: Any, connect: Callable[..., T], *args: Any) -> T:
    """`connect(*args)`, a new connection for `db`: within a deadline's context, refused at
    once while the database is taken for hung, and a connection timeout (the kernel
    completed the handshake, the server never answered the startup packet: the same hang)
    makes it taken for hung."""
    seconds = _seconds.get()
    if not seconds:
        return connect(*args)
    if _hung:
        _admit(db.alias, seconds)
    try:
        connection = connect(*args)
    except ConnectionTimeout as exc:
        _hold(db.alias, seconds)
        raise DatabaseNotAnswering(
            "the database did not answer a new connection within its connect_timeout"
        ) from exc
    except Exception:
        _hung.pop(db.alias, None)  # refused, or an answer: not hung
        raise
    _hung.pop(db.alias, None)
    return connection


def _hold(alias: str, seconds: float) -> None:
    """Take `alias` for hung: its queries with a deadline fail at once until the check,
    HOLD_SECONDS from now, gets an answer (each query's, and the check's, within `seconds`)."""
    with _lock:
        _hung[alias] = time.monotonic() + HOLD_SECONDS
        _check_start(alias, seconds)


def holds_reset() -> None:
    """Forget that a database did not answer (a test's fresh start)."""
    _hung.clear()


def _admit(alias: str, seconds: float) -> None:
    """Raise DatabaseNotAnswering while `alias` is taken for hung; the check's own queries
    are let through. A check that died is started again."""
    if _checking.get():
        return
    until = _hung.get(alias)
    if until is None:
        return
    if alias not in _checkers:
        with _lock:
            if alias in _hung:
                _check_start(alias, seconds)
    left = until - time.monotonic()
    when = f"for {left:.1f} s" if left > 0 else "until a check under way is answered"
    raise DatabaseNotAnswering(
        f"the database did not answer lately (DATABASE_READ_TIMEOUT_MS): not asked again {when}"
    )


def _check_start(alias: str, seconds: float) -> None:
    """Start the check's thread of `alias` unless it runs; with `_lock` held."""
    if alias not in _checkers:
        checker = threading.Thread(
            target=_check, args=(alias, seconds), name="db-check", daemon=True
        )
        _checkers[alias] = checker
        checker.start()


def _check(alias: str, seconds: float) -> None:
    """The check's thread: while `alias` is taken for hung, wait for the time its hold
    names, then ask (`_ask`); leave once a query of this process got an answer."""
    _checking.set(True)
    try:
        while True:
            with _lock:
                until = _hung.get(alias)
                if until is None:
                    del _checkers[alias]
                    return
            wait = until - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            _ask(alias, seconds)
            with _lock:
                if _hung.get(alias) == until:  # no outcome recorded: not asked again at once
                    _hung[alias] = time.monotonic() + HOLD_SECONDS
    except BaseException:
        with _lock:
            _checkers.pop(alias, None)
        raise


def _ask(alias: str, seconds: float) -> None:
    """One `SELECT 1` on a new connection to `alias`, within `seconds` (and the connection's
    connect_timeout). Its outcome is what `_run` and `connecting` make of any query's: an
    answer ends the hold, the deadline or a connection timeout renews it, a refusal ends it
    (a stopped server refuses every query at once anyway)."""
    from django.db import connections

    db = connections[alias]  # this thread's own connection
    try:
        with read_deadline(seconds), db.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # noqa: BLE001, S110 - the outcome is recorded by the hold itself
        pass
    finally:
        with contextlib.suppress(Exception):
            db.close()


def socket_identity(connection: Any) -> tuple[int, int] | None:
    """(file descriptor, inode) of a new psycopg connection's socket, read once per
    connection: the watchdog shuts a descriptor down only while it still names that
    socket (libpq closes it itself when it finds the connection lost, and the kernel may
    give the number to the next file opened)."""
    try:
        fd = connection.pgconn.socket
        return fd, os.fstat(fd).st_ino
    except Exception:  # noqa: BLE001 - no socket: such a connection gets no deadline
        return None


def _watchdog_start() -> None:
    global _watchdog  # noqa: PLW0603
    with _lock:
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch, name="db-read-deadline", daemon=True)
            _watchdog.start()


def _watch() -> None:
    while True:
        time.sleep(TICK_SECONDS)
        now = time.monotonic()
        with _lock:
            for armed in tuple(_armed):  # a copy: queries are armed without the lock
                if not armed.fired and armed.deadline <= now:
                    armed.fired = True
                    _shut_down(armed.fd, armed.inode)


def _shut_down(fd: int, inode: int) -> None:
    """Shut down the socket behind psycopg's descriptor `fd` if it is still the socket
    `inode`: its blocked read returns at once. The descriptor itself is left to psycopg
    (libpq closes it on the error): a duplicate is shut down and closed, which acts on the
    same socket."""
    try:
        dup = os.dup(fd)
    except OSError:  # closed meanwhile
        return
    try:
        if os.fstat(dup).st_ino != inode:  # closed, and the number given to another file
            os.close(dup)
            return
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already shut down, or not connected any more
        pass
    finally:
        sock.close()


def _after_fork_in_child() -> None:
    """A forked child (a gunicorn worker of a preloaded master) has no watchdog thread, and
    the lock may have been held by a thread that does not exist in it."""
    global _watchdog, _lock  # noqa: PLW0603
    _watchdog, _lock = None, threading.Lock()
    _armed.clear()
    _hung.clear()
    _checkers.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
