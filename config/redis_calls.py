"""Lua script calls of several services sent to Redis in one round trip.

A cache miss ends with two writes at the same moment: the settlement of its reservation
(quotas) and the store of its answer, which also releases its single-flight lock (caching).
The service that writes second hands its call to the other as a `ScriptCall`, and
`run_calls` sends them together: one pipelined round trip instead of two. Each call learns
its own reply or error; one failing does not hide the other's result. The same request's
ledger INSERT runs while that round trip is out (`meanwhile`), so a miss waits for the
slower of the two, not for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError


@dataclass(slots=True)
class ScriptCall:
    """One EVALSHA of a script registered with redis-py (`client.register_script`)."""

    script: Any  # redis.commands.core.Script
    keys: list[Any]
    args: list[Any]
    reply: Any = None
    error: BaseException | None = None
    ran: bool = False  # sent, with a reply or an error


def run_calls(calls: Sequence[ScriptCall], meanwhile: Callable[[], None] | None = None) -> None:
    """Send `calls` in one round trip (a pipeline, not a transaction: each script is atomic
    on its own). A script Redis does not know (restarted, SCRIPT FLUSH) is loaded and its
    call sent again; a script that was refused did not run, so that is safe. Never raises
    for Redis: each call holds its reply or its error (a lost connection is every call's
    error).

    `meanwhile`, if given, runs exactly once while Redis works: after the calls are sent,
    before their replies are read (or after a failed send). So another round trip (the
    ledger INSERT of the same request) overlaps this one instead of following it. Its
    exception propagates, once the replies have been read."""
    pending = [call for call in calls if not call.ran]
    if not pending:
        if meanwhile is not None:
            meanwhile()
        return
    client = pending[0].script.registered_client
    _exchange(client, pending, meanwhile)
    # Scripts Redis refused as unknown did not run: load them, send those calls again.
    retry = [call for call in pending if isinstance(call.error, NoScriptError)]
    if not retry:
        return
    try:
        for call in retry:
            call.script.sha = client.script_load(call.script.script)
    except Exception as exc:
        for call in retry:
            call.error = exc
        return
    for call in retry:
        call.error, call.ran = None, False
    _exchange(client, retry, None)


def _exchange(
    client: redis.Redis, calls: list[ScriptCall], meanwhile: Callable[[], None] | None
) -> None:
    """Write every call's EVALSHA on one pooled connection, run `meanwhile`, read the
    replies in order: redis-py's pipeline does the same but cannot be told to do something
    between its write and its read. A connection that failed half-way is dropped, not
    returned to the pool with replies unread."""
    pool = client.connection_pool
    connection = None
    try:
        connection = pool.get_connection()
        connection.send_packed_command(
            connection.pack_commands(
                [("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args) for c in calls]
            )
        )
    except Exception as exc:  # nothing is known to have run
        for call in calls:
            call.error, call.ran = exc, True
        if connection is not None:
            connection.disconnect()
            pool.release(connection)
        connection = None
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        if connection is not None:
            _read_replies(connection, calls)
            pool.release(connection)


def _read_replies(connection: Any, calls: list[ScriptCall]) -> None:
    for i, call in enumerate(calls):
        try:
            call.reply = connection.read_response()
        except ResponseError as exc:  # this script's error; the connection is fine
            call.error = exc
        except Exception as exc:  # the connection: this reply and the rest are lost
            connection.disconnect()
            for lost in calls[i:]:
                lost.error, lost.ran = exc, True
            return
        call.ran = True
