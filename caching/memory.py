"""The in-process memory layer: a thread-safe LRU with a size bound and per-entry expiry.

Entries hold the serialised answer (a JSON string), not the decoded object, so that a caller
mutating the dict it got back can never corrupt what the next request is served. Expiry
times are wall-clock seconds (`time.time()`) so tests can pass `now` instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class MemoryEntry:
    payload: str
    expires_at: float


class MemoryLayer:
    """LRU of at most `max_size` entries; an entry expires at its own `expires_at`.

    `max_size` 0 disables the layer (every get misses, every put is dropped).

    `invalidations` counts the calls that dropped entries on purpose (`delete`,
    `delete_matching`, `delete_prefix`, `clear`; not expiry nor LRU eviction), whether they
    found anything or not: see `put`'s `unless_invalidated_since`.
    """

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self._data: OrderedDict[str, MemoryEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, *, now: float | None = None) -> str | None:
        """The payload of a live entry (and mark it most recently used), else None."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry.expires_at <= (time.time() if now is None else now):
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry.payload

    def put(
        self,
        key: str,
        payload: str,
        *,
        expires_at: float,
        unless_invalidated_since: int | None = None,
    ) -> None:
        """Store an entry, evicting the least recently used ones past the size bound.

        `unless_invalidated_since`: the `invalidations` count read before the payload was
        read from (or written to) Redis; if an invalidation was applied since, the entry is
        not stored. That invalidation may have been meant for it, and this process will not
        apply it again: stored now, the entry would outlive its purge here until it expires.
        """
        if self.max_size <= 0:
            return
        with self._lock:
            if (
                unless_invalidated_since is not None
                and self.invalidations != unless_invalidated_since
            ):
                return
            self._data[key] = MemoryEntry(payload, expires_at)
            self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove the given keys; returns how many were present."""
        removed = 0
        with self._lock:
            self.invalidations += 1
            for key in keys:
                if self._data.pop(key, None) is not None:
                    removed += 1
        return removed

    def delete_matching(self, matches: Callable[[str], bool]) -> int:
        """Remove every key for which `matches` is true (an invalidation pattern's
        `KeyPattern.matches`); returns how many were removed."""
        with self._lock:
            self.invalidations += 1
            doomed = [k for k in self._data if matches(k)]
            for key in doomed:
                del self._data[key]
        return len(doomed)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with `prefix` (a namespace drop)."""
        with self._lock:
            self.invalidations += 1
            doomed = [k for k in self._data if k.startswith(prefix)]
            for key in doomed:
                del self._data[key]
        return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self.invalidations += 1
            self._data.clear()

    def keys(self) -> list[str]:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return list(self._data)
