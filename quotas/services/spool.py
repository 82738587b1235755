"""The ledger spool: ledger rows the database could not take, kept on local disk until it
can, so that a worker killed meanwhile (SIGKILL, the OOM killer, gunicorn's timeout, a
deploy) loses none of them. Each row records a request already served and charged in Redis.

Each process appends to a segment file of its own in LEDGER_SPOOL_DIR (a directory per
database) and holds an exclusive `flock` on it while it may write there. A row is written
with one `write` and no `fsync`: it survives the process, not the machine. A replay
(`spool_replay`) takes every segment it can lock: this process's own (closed first: later
rows go to a new segment) and those of processes that are gone, whose locks the kernel
released. It hands their rows to the ledger's writer and deletes each segment once written.
A segment a live process holds is left to it. The writer skips a request id already in the
ledger, so a replay cut short and done again writes nothing twice.

Rows are stored by column name with their database-ready values (decimals and datetimes
tagged), so a segment written before a migration that adds a column is still read.

Whatever lies in the spool is written to the ledger as served requests, so only this
process's user may put it there: the directories are made 0700 and the files 0600, and a
spool directory that another user owns or may write to (one planted in a shared /tmp before
the service first ran) is neither written nor replayed; the rows wait in memory and an
error says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
BATCH_ROWS = 500  # rows handed to the writer at a time

_lock = threading.Lock()  # the current segment, between request threads and the flusher
_segment: tuple[int, Any] | None = None  # (the pid that opened it, its file object)
_refused: set[str] = set()  # spool directories refused, told once


def spool_dir() -> Path:
    """This database's directory under LEDGER_SPOOL_DIR: rows are written back only to the
    database they were meant for, whatever else runs on the host."""
    db = connection.settings_dict
    ident = "|".join(str(db.get(k) or "") for k in ("ENGINE", "HOST", "PORT", "NAME"))
    return Path(settings.LEDGER_SPOOL_DIR) / hashlib.sha256(ident.encode()).hexdigest()[:16]


def _private_dir() -> Path:
    """This database's spool directory, made if need be, once it is known to be this
    user's alone (see the module's docstring); PermissionError if it is not. Its parent,
    LEDGER_SPOOL_DIR, must be this user's or root's, and either closed to others or
    sticky (like /tmp), so that no one else can swap the directory for theirs."""
    directory = spool_dir()
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    parent, own = os.lstat(directory.parent), os.lstat(directory)
    if not (
        stat.S_ISDIR(own.st_mode)
        and own.st_uid == os.geteuid()
        and not own.st_mode & 0o022
        and parent.st_uid in (os.geteuid(), 0)
        and (not parent.st_mode & 0o022 or parent.st_mode & stat.S_ISVTX)
    ):
        raise PermissionError(
            f"ledger spool directory {directory} is not this user's alone (mode "
            f"{stat.S_IMODE(own.st_mode):o}, owner uid {own.st_uid}; its parent's mode "
            f"{stat.S_IMODE(parent.st_mode):o}, owner uid {parent.st_uid}): not used"
        )
    if own.st_mode & 0o077:  # made by an earlier release, readable by others
        os.chmod(directory, 0o700)
    return directory


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    raise TypeError(f"not a ledger value: {type(value).__name__}")


def _decode(obj: dict[str, Any]) -> Any:
    if obj.keys() == {"$decimal"}:
        return Decimal(obj["$decimal"])
    if obj.keys() == {"$datetime"}:
        return datetime.fromisoformat(obj["$datetime"])
    return obj


def spool_append(rows: list[dict[str, Any]]) -> int:
    """Append rows to this process's segment; how many of them, from the first, it holds
    (fewer than all if the spool cannot be written: a full disk, no such directory; the
    caller keeps the rest in memory)."""
    global _segment  # noqa: PLW0603
    data = "".join(json.dumps(row, default=_encode, separators=(",", ":")) + "\n" for row in rows)
    encoded = data.encode()
    with _lock:
        written = 0
        try:
            if _segment is None or _segment[0] != os.getpid():  # none yet, or a forked parent's
                _segment = (os.getpid(), _open_segment())
            while written < len(encoded):
                written += os.write(_segment[1].fileno(), encoded[written:])
        except OSError:
            if _segment is not None:
                # A row cut short ends this segment: later rows start a new one, so that
                # only that row's line is incomplete (and skipped by the replay).
                _segment[1].close()
                _segment = None
            kept = encoded[:written].count(b"\n")
            logger.exception("ledger spool not writable: %d rows kept in memory", len(rows) - kept)
            return kept
    return len(rows)


def _open_segment() -> Any:
    """A new segment of this process's, locked. Between the file's creation and its lock,
    a replay in another process may take it (empty, unlocked) and delete it; rows written
    to it then would be in no file at all, so a segment found deleted once locked is let
    go and another one made."""
    directory = _private_dir()
    while True:
        path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        segment = os.fdopen(fd, "ab", buffering=0)
        fcntl.flock(segment.fileno(), fcntl.LOCK_EX)
        if not _replaced(path, segment):
            return segment
        segment.close()


def spool_forget() -> None:
    """Close this process's segment: later rows go to a new one (a replay; tests)."""
    global _segment  # noqa: PLW0603
    with _lock:
        if _segment is not None:
            if _segment[0] == os.getpid():
                _segment[1].close()  # releases its lock: a replay takes it like any other
            _segment = None


def spool_pending() -> bool:
    """Whether any segment (this process's or another's) waits to be written."""
    try:
        return any(entry.name.endswith(SUFFIX) for entry in os.scandir(spool_dir()))
    except OSError:  # no spool yet, or none can be made there (spool_append said so)
        return False


def _replayable() -> Path | None:
    """The spool directory if its rows may be replayed; None (with an error) if another
    user could have put them there."""
    try:
        return _private_dir()
    except PermissionError as exc:
        if str(exc) not in _refused:  # once per process, not at every replay
            _refused.add(str(exc))
            logger.error("ledger spool not replayed: %s", exc)
        return None


def spool_replay(write: Callable[[list[dict[str, Any]]], None]) -> int:
    """Hand the rows of every segment this process can lock to `write`, a batch at a
    time, and delete each segment once all of it is written; the number of rows handed.
    An error of `write` (the database still unavailable) leaves the segment for the next
    replay and is raised."""
    if not spool_pending() or (directory := _replayable()) is None:
        return 0
    spool_forget()
    handed = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        for batch in _locked_batches(path):
            write(batch)
            handed += len(batch)
    return handed


def _locked_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    """The rows of one segment in batches, if this process can lock it; the segment is
    deleted when the last batch has been taken without error."""
    try:
        segment = open(path, "rb")  # noqa: SIM115 - closed below, after its deletion
    except FileNotFoundError:  # another process replayed it meanwhile
        return
    with segment:
        try:
            fcntl.flock(segment.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process writes or replays it
            return
        if _replaced(path, segment):
            return
        if os.fstat(segment.fileno()).st_uid != os.geteuid():
            logger.error("ledger spool: %s is not this user's, not written", path.name)
            return
        rows = list(_rows(path, segment))
        for start in range(0, len(rows), BATCH_ROWS):
            yield rows[start : start + BATCH_ROWS]
        path.unlink()
        if rows:
            logger.warning("ledger spool: %d rows of %s written", len(rows), path.name)


def _replaced(path: Path, segment: Any) -> bool:
    """Whether `path` no longer names the file locked (deleted by another replay after
    this one opened it)."""
    try:
        return os.stat(path).st_ino != os.fstat(segment.fileno()).st_ino
    except FileNotFoundError:
        return True


def _rows(path: Path, segment: Any) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(segment, start=1):
        try:
            row = json.loads(line, object_hook=_decode)
        except ValueError:  # cut off by a crash of the machine mid-write
            logger.error("ledger spool: line %d of %s is incomplete, skipped", number, path.name)
            continue
        yield row
