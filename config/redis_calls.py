"""Lua script calls of several services sent to Redis in one round trip.

A cache miss ends with two writes at the same moment: the settlement of its reservation
(quotas) and the store of its answer, which also releases its single-flight lock (caching).
The service that writes second hands its call to the other as a `ScriptCall`, and
`run_calls` sends them together: one pipelined round trip instead of two. Each call learns
its own reply or error; one failing does not hide the other's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError


@dataclass(slots=True)
class ScriptCall:
    """One EVALSHA of a script registered with redis-py (`client.register_script`)."""

    script: Any  # redis.commands.core.Script
    keys: list[Any]
    args: list[Any]
    reply: Any = None
    error: BaseException | None = None
    ran: bool = False  # sent, with a reply or an error


def run_calls(calls: Sequence[ScriptCall]) -> None:
    """Send `calls` in one round trip (a pipeline, not a transaction: each script is atomic
    on its own). A script Redis does not know (restarted, SCRIPT FLUSH) is loaded and its
    call sent again; a script that was refused did not run, so that is safe. Never raises:
    each call holds its reply or its error (a lost connection is every call's error)."""
    pending = [call for call in calls if not call.ran]
    if not pending:
        return
    client = pending[0].script.registered_client
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for call in pending:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection: nothing is known to have run
            for call in pending:
                call.error, call.ran = exc, True
            return
        retry = []
        for call, reply in zip(pending, replies, strict=True):
            if isinstance(reply, NoScriptError) and attempt == 0:
                retry.append(call)
            elif isinstance(reply, Exception):
                call.error, call.ran = reply, True
            else:
                call.reply, call.ran = reply, True
        if not retry:
            return
        try:
            for call in retry:
                call.script.sha = client.script_load(call.script.script)
        except Exception as exc:
            for call in retry:
                call.error, call.ran = exc, True
            return
        pending = retry
