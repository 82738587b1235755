"""The actor of the changes made in this thread (the admin sets it; commands leave it
empty), so that the audit trail can say who changed a limit."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

current_actor: contextvars.ContextVar[Any] = contextvars.ContextVar("audit_actor", default=None)


@contextmanager
def acting_as(user: Any) -> Iterator[None]:
    token = current_actor.set(user)
    try:
        yield
    finally:
        current_actor.reset(token)
