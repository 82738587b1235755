"""A PostgreSQL server that hangs: the read deadline of the request path (config/db/deadline.py).

The hung server is the test database behind a loopback proxy that stops forwarding
(config/tests/freezable_proxy.py): the kernel still accepts connections and data, nothing
answers, as in bench/outage.py's postgres-freeze drill. Each test that freezes it also
thaws it from a timer, well past any deadline, so that a deadline that does not work fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import OperationalError, close_old_connections, connection, transaction

from config.db import deadline
from config.db.deadline import DatabaseNotAnswering, read_deadline
from config.tests.freezable_proxy import FreezableProxy
from config.tests.test_database_connection import _generate
from config.tests.waiting import wait_until
from quotas.models import UsageRecord
from quotas.services import usage_flush
from quotas.services.spool import spool_pending

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
SAFETY_SECONDS = 20  # the proxy thaws by itself after this long, whatever the test does


class HungDatabase:
    """This thread's connection, through a proxy that can stop answering."""

    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy
        self._thaw: threading.Timer | None = None

    def freeze(self) -> None:
        self.proxy.freeze()
        self._thaw = threading.Timer(SAFETY_SECONDS, self.proxy.thaw)
        self._thaw.start()

    def thaw(self) -> None:
        if self._thaw is not None:
            self._thaw.cancel()
        self.proxy.thaw()

    @property
    def still_frozen(self) -> bool:
        """True until the safety timer has thawed the proxy: what was answered meanwhile
        was answered by the deadline, not by the server coming back."""
        return self.proxy.frozen.is_set()


@pytest.fixture
def hung_database(settings) -> Iterator[HungDatabase]:
    """The connection pointed at the proxy, with a half-second deadline on the request path
    and libpq's shortest connect_timeout (2 s); the test database directly afterwards."""
    saved = dict(connection.settings_dict)
    options = dict(saved.get("OPTIONS") or {})
    proxy = FreezableProxy((saved["HOST"] or "127.0.0.1", int(saved["PORT"] or 5432)))
    settings.DATABASE_READ_TIMEOUT = 0.5
    connection.close()
    connection.settings_dict.update(
        {"HOST": "127.0.0.1", "PORT": str(proxy.port), "OPTIONS": {**options, "connect_timeout": 2}}
    )
    hung = HungDatabase(proxy)
    try:
        yield hung
    finally:
        hung.thaw()
        connection.close()
        connection.settings_dict.update(
            {"HOST": saved["HOST"], "PORT": saved["PORT"], "OPTIONS": saved["OPTIONS"]}
        )
        proxy.close()
        deadline.holds_reset()


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def test_a_query_with_a_deadline_to_a_hung_server_fails_with_operational_error(hung_database):
    _select_one()  # connected while the server answers
    hung_database.freeze()

    with read_deadline(0.5), pytest.raises(DatabaseNotAnswering) as failed:
        _select_one()

    assert hung_database.still_frozen  # the deadline answered, not the server
    assert isinstance(failed.value, OperationalError)
    assert "did not answer within 0.5 s" in str(failed.value)
    assert connection.connection is None  # let go at once; the next query connects again


def test_after_a_deadline_queries_fail_at_once_until_the_check_gets_an_answer(
    hung_database, monkeypatch
):
    monkeypatch.setattr(deadline, "HOLD_SECONDS", 0.3)
    _select_one()
    hung_database.freeze()
    with read_deadline(0.5):
        with pytest.raises(DatabaseNotAnswering):
            _select_one()
        checker = deadline._checkers["default"]  # started with the hold

        with pytest.raises(DatabaseNotAnswering) as held:
            _select_one()  # neither a new connection nor a query is sent meanwhile
        assert "not asked again" in str(held.value)

        hung_database.thaw()
        # Past the hold the check asks the server by itself: no request is failed to start
        # it, and the first query after its answer goes through.
        wait_until(lambda: not deadline._hung, timeout=SAFETY_SECONDS, step=0.01)
        _select_one()

    assert checker.name == "db-check"
    checker.join(SAFETY_SECONDS)
    assert not checker.is_alive()  # gone with the hold
    assert "default" not in deadline._checkers


def test_the_check_asks_a_server_still_hung_again_every_hold_while_every_query_is_held(
    hung_database, monkeypatch
):
    """No request's query waits for a server still hung: the check, from a thread of its
    own, does (its new connection up to connect_timeout, 2 s, longer than the deadline),
    its timeout holds the database again, and it asks again a hold later."""
    monkeypatch.setattr(deadline, "HOLD_SECONDS", 0.2)
    _select_one()
    hung_database.freeze()
    with read_deadline(0.5), pytest.raises(DatabaseNotAnswering):
        _select_one()
    checker = deadline._checkers["default"]
    first_hold = deadline._hung["default"]

    with read_deadline(0.5):
        time.sleep(0.7)  # the check's connection is past the read deadline, not connect_timeout
        with pytest.raises(DatabaseNotAnswering) as held:
            _select_one()
        still_checking = checker.is_alive()  # the query did not wait for the check
    # connect_timeout (2 s) ends the check's first connection: held again, a hold later.
    wait_until(lambda: deadline._hung.get("default", 0) > first_hold, timeout=SAFETY_SECONDS)

    assert "not asked again until a check under way is answered" in str(held.value)
    assert still_checking
    assert checker.is_alive()  # it asks again at the end of the new hold
    assert hung_database.still_frozen

    hung_database.thaw()
    wait_until(lambda: not deadline._hung, timeout=SAFETY_SECONDS, step=0.01)
    checker.join(SAFETY_SECONDS)
    assert not checker.is_alive()


def test_a_commit_to_a_hung_server_fails_within_its_deadline(hung_database):
    _select_one()

    with read_deadline(0.5), pytest.raises(DatabaseNotAnswering), transaction.atomic():  # noqa: PT012
        _select_one()
        hung_database.freeze()  # the COMMIT gets no answer

    assert hung_database.still_frozen


def test_connecting_to_a_hung_server_is_bounded_by_connect_timeout(hung_database):
    # The kernel completes the handshake (the listen backlog), the startup packet gets no
    # answer: libpq's connect_timeout ends the wait.
    hung_database.freeze()

    with pytest.raises(OperationalError) as off_request_path:
        connection.ensure_connection()
    with read_deadline(0.5), pytest.raises(DatabaseNotAnswering):
        connection.ensure_connection()

    assert hung_database.still_frozen
    assert "connection timeout expired" in str(off_request_path.value)


def test_a_slow_query_on_the_request_path_is_cut_and_the_next_runs_on_a_new_connection():
    # A server that runs but does not answer in time is met as a hung one.
    connection.ensure_connection()
    before = connection.connection.info.backend_pid

    with (
        read_deadline(0.3),
        pytest.raises(DatabaseNotAnswering),
        connection.cursor() as cursor,
    ):
        cursor.execute("SELECT pg_sleep(5)")
    deadline.holds_reset()  # as a second later
    close_old_connections()  # what Django does at the end of every request

    with read_deadline(0.3):
        _select_one()
    assert connection.connection.info.backend_pid != before


def test_a_long_query_off_the_request_path_is_not_cut(settings, api_client):
    settings.DATABASE_READ_TIMEOUT = 0.2
    api_client.get("/health/live")  # a request began and ended on this thread

    with connection.cursor() as cursor:  # as in a command, a migration, a Celery task
        cursor.execute("SELECT pg_sleep(0.5), 1")
        assert cursor.fetchone() == ("", 1)
    with read_deadline(0.2), read_deadline(None), connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(0.5), 2")  # a view that lifts the deadline
        assert cursor.fetchone() == ("", 2)


def test_the_watchdog_shuts_the_socket_down_and_leaves_the_descriptor_open():
    ours, peer = socket.socketpair()
    with ours, peer:
        fd = ours.fileno()
        deadline._shut_down(fd, os.fstat(fd).st_ino + 1)  # another file under that number
        peer.sendall(b"x")
        assert ours.recv(1) == b"x"  # left alone

        deadline._shut_down(fd, os.fstat(fd).st_ino)

        assert ours.recv(1) == b""  # a blocked read would return
        assert os.fstat(fd)  # still open: psycopg closes it, not the watchdog


def test_generation_goes_on_while_the_database_hangs_and_its_rows_are_written_after(
    hung_database, key_client, local_model, caplog
):
    # A busy worker has read the key and its policy; past the second a key is read for,
    # the next request reads it again, from a server that has just hung.
    for prompt in ("warm", "warmer"):
        assert _generate(key_client, prompt, local_model.model).status_code == 200
    time.sleep(1.1)
    hung_database.freeze()

    answered = [_generate(key_client, f"hung {i}", local_model.model) for i in range(3)]
    still_frozen = hung_database.still_frozen
    hung_database.thaw()

    assert still_frozen  # every answer came while the server hung
    assert [r.status_code for r in answered] == [200] * 3, answered[0].content
    ids = [r.json()["request_id"] for r in answered]
    assert not UsageRecord.objects.filter(request_id__in=ids).exists()  # in the spool
    assert usage_flush() == 3  # the flush once the database answers again
    assert UsageRecord.objects.filter(request_id__in=ids, outcome="ok").count() == 3
    assert not [r for r in caplog.records if "retried" in r.getMessage()]


def test_a_served_requests_ledger_row_waits_less_for_a_hung_server_than_a_read(
    hung_database, key_client, local_model, caplog, settings
):
    settings.LEDGER_WRITE_TIMEOUT = 0.2  # the request path's other queries get 0.5 s
    for prompt in ("warm", "warmer"):  # the key and its policy read, as in a busy worker
        assert _generate(key_client, prompt, local_model.model).status_code == 200
    hung_database.freeze()  # the key is still known: the row's INSERT is the only query

    answered = _generate(key_client, "hung", local_model.model)
    still_frozen = hung_database.still_frozen
    hung_database.thaw()

    assert still_frozen
    assert answered.status_code == 200
    kept = [r.getMessage() for r in caplog.records if "ledger rows kept" in r.getMessage()]
    assert len(kept) == 1
    assert "did not answer within 0.2 s" in kept[0]
    assert usage_flush() == 1
    assert UsageRecord.objects.filter(request_id=answered.json()["request_id"]).count() == 1


def test_a_shorter_deadline_applies_only_where_a_deadline_does():
    with deadline.deadline_at_most(0.2):
        assert deadline._seconds.get() == 0  # a command, a task: still none
    with read_deadline(5), deadline.deadline_at_most(0.2):
        assert deadline._seconds.get() == 0.2
    with read_deadline(0.1), deadline.deadline_at_most(0.2):
        assert deadline._seconds.get() == 0.1  # never longer
    with read_deadline(5), deadline.deadline_at_most(0):
        assert deadline._seconds.get() == 5


def test_readiness_fails_while_the_database_hangs(hung_database, api_client, settings):
    settings.HEALTH_CHECK_TIMEOUT = 0.3
    settings.HEALTH_REQUIRED_CHECKS = ["database"]
    assert api_client.get("/health/ready").status_code == 200
    hung_database.freeze()

    response = api_client.get("/health/ready")

    assert hung_database.still_frozen
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["status"] == "fail"


def test_the_ledger_flusher_leaves_a_hung_database_its_rows_kept(hung_database, user):
    from quotas.models import Outcome
    from quotas.services import ledger

    ledger._hit_queue.put(
        ledger._row(
            request_id="hit-while-hung",
            user_id=user.pk,
            api_key_id=None,
            model="local/demo",
            provider="local",
            cached=True,
            outcome=Outcome.CACHED,
            latency_ms=1,
        )
    )
    _select_one()
    hung_database.freeze()

    ledger._flush_once()  # what the flusher thread does each second

    assert hung_database.still_frozen
    assert spool_pending()  # the row, kept for the next flush
    hung_database.thaw()
    usage_flush()  # the next second
    # The server, once it runs again, may also run the INSERT it had received before the
    # deadline: the spooled copy does not double the row (ON CONFLICT on the request id).
    assert UsageRecord.objects.filter(request_id="hit-while-hung").count() == 1
    assert not spool_pending()


EXIT_WHILE_FLUSHING = """
import sys, time
import django
django.setup()
from quotas.services import ledger

for i in range(3):
    ledger._keep(
        ledger._row(request_id=f"hit-at-exit-{i}", user_id=int(sys.argv[1]), model="local/demo",
                    provider="local", cached=True, outcome="cached", latency_ms=1)
    )
while not ledger._hit_queue.empty():  # the flusher has taken them: it is writing them now
    time.sleep(0.01)
time.sleep(0.2)
print("taken", flush=True)
# A graceful exit (gunicorn's after SIGTERM or max_requests: sys.exit, then atexit).
"""


def test_hit_rows_the_flusher_is_writing_when_the_worker_exits_are_not_lost(hung_database, user):
    """A worker stopped gracefully (a deploy, max_requests) while its flusher waits on a
    hung server with rows it took from the queue: the exit waits for that flush (bounded
    by its deadlines), which keeps the rows in the spool. They died with the process."""
    db = connection.settings_dict  # the proxy's address: the spool of this test's database
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DATABASE_CONNECT_TIMEOUT": "2",
        "USAGE_HIT_BATCH_SECONDS": "0.1",
        "LEDGER_SPOOL_DIR": django_settings.LEDGER_SPOOL_DIR,
    }
    env.pop("TEST_DATABASE_NAME", None)
    hung_database.freeze()  # the worker's flusher gets no answer

    run = subprocess.run(
        [sys.executable, "-c", EXIT_WHILE_FLUSHING, str(user.pk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SAFETY_SECONDS,
        check=True,
    )
    still_frozen = hung_database.still_frozen
    hung_database.thaw()

    assert run.stdout == "taken\n"
    assert still_frozen  # the worker exited while the server hung
    assert spool_pending()
    assert usage_flush() == 3
    assert UsageRecord.objects.filter(request_id__startswith="hit-at-exit-").count() == 3
