"""The ledger spool: rows PostgreSQL could not take outlive the worker that kept them (real
worker processes, real PostgreSQL and Redis; quotas/services/spool.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import ProgrammingError

from quotas.models import UsageRecord
from quotas.services import ledger, usage_flush
from quotas.services.spool import spool_dir

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]

# Two requests of 100 prompt and 60 completion tokens at 1.50 / 2.00 USD per million.
COST = Decimal("0.000270")


def _segments() -> list[str]:
    return sorted(p.name for p in spool_dir().glob("*.jsonl")) if spool_dir().exists() else []


def test_rows_a_killed_worker_kept_are_written_by_another(
    worker_factory, user, plan_for, hidden_ledger
):
    plan_for(user, requests_per_minute=100)
    worker = worker_factory()
    with hidden_ledger:
        reply = worker.ask(op="admit", user_id=user.pk, threads=2, settle_tokens=[100, 60])
        assert reply["admitted"] == 2  # served and charged in Redis; the ledger refused both
    assert UsageRecord.objects.filter(user=user).count() == 0

    # While that worker lives, its segment is its own: another process leaves it alone.
    assert usage_flush() == 0
    assert len(_segments()) == 1

    worker.proc.send_signal(signal.SIGKILL)  # no atexit, no flush: what it kept in memory dies
    worker.proc.wait(10)

    assert usage_flush() == 2
    rows = UsageRecord.objects.filter(user=user)
    assert rows.count() == 2
    assert {(r.prompt_tokens, r.completion_tokens, r.outcome) for r in rows} == {(100, 60, "ok")}
    assert sum(r.cost_usd for r in rows) == COST * 2
    assert _segments() == []
    assert usage_flush() == 0  # written once


def test_a_worker_writes_its_own_kept_rows_once_the_database_is_back(
    worker_factory, user, plan_for, hidden_ledger
):
    plan_for(user, requests_per_minute=100)
    worker = worker_factory()
    with hidden_ledger:
        worker.ask(op="admit", user_id=user.pk, threads=1, settle_tokens=[100, 60])
        assert worker.ask(op="flush") == {"error": "ProgrammingError"}
    assert worker.ask(op="flush") == {"written": 1}
    assert UsageRecord.objects.filter(user=user).count() == 1
    assert _segments() == []


def test_kept_rows_are_written_by_the_worker_itself_when_hit_rows_are_not_batched(
    worker_factory, user, plan_for, hidden_ledger
):
    # USAGE_HIT_BATCH_SECONDS=0 (hit rows written at once): no flusher runs until a row is
    # spooled; then one replays the spool, with no usage_flush() from anyone.
    plan_for(user, requests_per_minute=100)
    worker = worker_factory(LEDGER_SPOOL_REPLAY_SECONDS="0.2")
    with hidden_ledger:
        reply = worker.ask(op="admit", user_id=user.pk, threads=1, settle_tokens=[100, 60])
        assert reply["admitted"] == 1
        assert len(_segments()) == 1

    deadline = time.monotonic() + 10
    while not UsageRecord.objects.filter(user=user).exists() and time.monotonic() < deadline:
        time.sleep(0.1)

    assert UsageRecord.objects.filter(user=user).count() == 1
    assert _segments() == []


def _queue_hit(user, request_id: str) -> None:
    """A cache hit's ledger row, queued for the next flush as a served hit's is."""
    ledger._hit_queue.put(
        ledger._row(
            request_id=request_id,
            user_id=user.pk,
            model="local/demo",
            provider="local",
            cached=True,
            outcome="cached",
        )
    )


def _spool_metric(event: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tollgate_ledger_spool_rows_total", {"event": event}) or 0.0


def test_queued_hit_rows_a_failed_flush_could_not_write_go_to_the_spool(user, hidden_ledger):
    kept, written = _spool_metric("kept"), _spool_metric("written")
    _queue_hit(user, "hit-1")
    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()

    assert ledger._hit_queue.empty()
    assert len(_segments()) == 1
    assert _spool_metric("kept") == kept + 1
    assert usage_flush() == 1
    assert UsageRecord.objects.get(request_id="hit-1").cached
    assert _spool_metric("written") == written + 1


def _spool_line(user, request_id: str) -> str:
    """A served request's row as a segment holds it (what spool_append writes)."""
    row = ledger._row_to_spool(
        ledger._row(
            request_id=request_id,
            user_id=user.pk,
            model="local/demo",
            provider="local",
            prompt_tokens=7,
            completion_tokens=3,
            cost_usd=Decimal("0.000017"),
            outcome="ok",
        )
    )
    return json.dumps(
        row,
        default=lambda v: (
            {"$decimal": str(v)} if isinstance(v, Decimal) else {"$datetime": v.isoformat()}
        ),
    )


def test_an_incomplete_last_line_is_skipped_and_the_rest_written(user, caplog):
    line = _spool_line(user, "whole")
    spool_dir().mkdir(mode=0o700, parents=True)
    (spool_dir() / "4242-dead.jsonl").write_text(line + "\n" + line[: len(line) // 2])

    assert usage_flush() == 1
    assert UsageRecord.objects.get(request_id="whole").cost_usd == Decimal("0.000017")
    assert "incomplete" in caplog.text
    assert _segments() == []


def test_the_spool_is_this_users_alone(user, hidden_ledger):
    _queue_hit(user, "hit-3")
    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()

    (segment,) = spool_dir().glob("*.jsonl")
    assert stat.S_IMODE(spool_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(spool_dir().parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600


@pytest.mark.parametrize("opened", ["directory", "parent"])
def test_a_spool_others_may_write_to_is_neither_replayed_nor_written(
    user, hidden_ledger, caplog, opened
):
    """Rows in the spool are written to the ledger as served requests: a directory another
    user could have put them in (one made in a shared /tmp before the service first ran) is
    not trusted. The rows meant for it wait in memory instead."""
    spool_dir().mkdir(mode=0o700, parents=True)
    (spool_dir() / "4242-planted.jsonl").write_text(_spool_line(user, "planted") + "\n")
    (spool_dir() if opened == "directory" else spool_dir().parent).chmod(0o777)

    assert usage_flush() == 0
    assert not UsageRecord.objects.filter(request_id="planted").exists()
    assert "is not this user's alone" in caplog.text

    _queue_hit(user, "hit-4")
    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()
    assert not ledger._hit_queue.empty()  # kept in memory, not in the open directory
    assert _segments() == ["4242-planted.jsonl"]

    if opened == "directory":
        assert usage_flush() == 1  # the row kept in memory; the planted one still not
        assert not UsageRecord.objects.filter(request_id="planted").exists()
    else:
        spool_dir().parent.chmod(0o1777)  # sticky, like /tmp: no one else can swap the spool
        assert usage_flush() == 2
        assert UsageRecord.objects.filter(request_id__in=["planted", "hit-4"]).count() == 2


def test_a_spool_made_readable_by_an_earlier_release_is_closed_and_replayed(user):
    spool_dir().mkdir(mode=0o755, parents=True)
    (spool_dir() / "4242-dead.jsonl").write_text(_spool_line(user, "earlier") + "\n")

    assert usage_flush() == 1
    assert UsageRecord.objects.filter(request_id="earlier").exists()
    assert stat.S_IMODE(spool_dir().stat().st_mode) == 0o700


def test_a_new_segment_a_replay_deleted_before_its_lock_is_not_written_to(monkeypatch):
    """A replay in another worker can take a segment between its creation and its writer's
    lock (it is empty and unlocked then) and delete it. Rows the writer then appended went
    to a file no longer in the directory, and were lost: about one segment of rows in two
    of five 20-second postgres-freeze drills (bench/outage.py). The writer now sees, once
    it holds the lock, that its file is gone, and writes to a new one."""
    import fcntl

    from quotas.services import spool

    real_flock = fcntl.flock
    raced: list[list[list[dict]]] = []

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX and not raced:  # the writer's lock, not a replay's
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            # Another process's replay (flock is per open file, so this is one): it locks
            # the empty segment, has nothing to write, and deletes it.
            raced.append(list(spool._locked_batches(path)))
        real_flock(fd, operation)

    spool.spool_forget()
    monkeypatch.setattr(fcntl, "flock", flock)
    rows = [{"request_id": f"raced-{i}", "prompt_tokens": i} for i in range(3)]

    assert spool.spool_append(rows) == 3
    handed: list[dict] = []
    assert spool.spool_replay(handed.extend) == 3

    assert raced == [[]]  # the race happened: the first segment was deleted, empty
    assert handed == rows
    assert _segments() == []


def test_rows_stay_in_memory_when_the_spool_cannot_be_written(user, hidden_ledger, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings.LEDGER_SPOOL_DIR = str(blocker)
    _queue_hit(user, "hit-2")
    with hidden_ledger, pytest.raises(ProgrammingError):
        usage_flush()

    assert not ledger._hit_queue.empty()
    assert usage_flush() == 1
    assert UsageRecord.objects.filter(request_id="hit-2").exists()


def test_a_segment_of_another_database_is_not_written_here(user, settings):
    other = dict(settings.DATABASES["default"], NAME="some_other_database")
    from django.db import connection

    mine = spool_dir()
    connection.settings_dict, original = other, connection.settings_dict
    try:
        theirs = spool_dir()
    finally:
        connection.settings_dict = original
    assert theirs != mine


SHORT_WRITE = """
import resource, sys
import django
django.setup()
from quotas.services import ledger
from quotas.services.spool import spool_append

rows = [
    ledger._row_to_spool(
        ledger._row(request_id=f"cut-{i}", user_id=int(sys.argv[1]), model="local/demo",
                    provider="local", cached=True, outcome="cached")
    )
    for i in range(11)
]
# Files of at most 1,500 bytes: the first segment fills up part-way through a row.
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))
first = spool_append(rows[:10])
print(first, spool_append(rows[10:]))
"""


def test_a_row_cut_short_by_a_full_disk_stays_in_memory_and_ends_its_segment(user):
    # A separate process: the file size limit stands in for a disk that fills up.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "LEDGER_SPOOL_DIR": settings.LEDGER_SPOOL_DIR,
        "DATABASE_URL": _database_url(),
    }
    run = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(user.pk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    first, second = map(int, run.stdout.split())
    assert 0 < first < 10  # the rows before the one cut short: the rest are the caller's
    assert second == 1  # a new segment takes the next row
    assert len(_segments()) == 2

    assert usage_flush() == first + 1
    written = set(UsageRecord.objects.values_list("request_id", flat=True))
    assert written == {f"cut-{i}" for i in range(first)} | {"cut-10"}
    assert _segments() == []


def _database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{db['USER']}@{host}:{port}/{db['NAME']}"
