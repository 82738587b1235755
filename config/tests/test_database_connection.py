"""A persistent database connection the server drops: what callers see (config/db/base.py).

The server side of the connection is really terminated with pg_terminate_backend, as a
PostgreSQL restart or an idle-connection reaper would. A database not migrated yet is a
real, empty PostgreSQL database.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from psycopg import sql

from quotas.models import UsageRecord
from quotas.services import usage_flush

pytestmark = pytest.mark.django_db(transaction=True)


def _drop_server_side() -> None:
    """Terminate the backend of this thread's Django connection from another connection."""
    _terminate(connection.connection.info.backend_pid)


def _dsn() -> str:
    """A libpq connection string to the test database, for a connection of the test's own."""
    db = settings.DATABASES["default"]
    return f"host={db['HOST']} port={db['PORT'] or 5432} user={db['USER']} dbname={db['NAME']}"


def _terminate(pid: int) -> None:
    with psycopg.connect(_dsn(), autocommit=True) as other:
        # Wait for the backend to be gone: pg_terminate_backend only signals it.
        other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


@pytest.fixture(autouse=True)
def _fresh_connection_after():
    yield
    connection.close()  # the test may leave a dead one; the database flush needs a live one


def _generate(client, prompt: str, model: str):
    return client.post("/api/v1/generate", {"prompt": prompt, "model": model}, format="json")


def test_a_healthy_connection_is_checked_without_a_query(monkeypatch):
    connection.ensure_connection()
    before = connection.connection.info.backend_pid
    connection.health_check_done = False
    monkeypatch.setattr(connection, "is_usable", lambda: pytest.fail("SELECT 1 was sent"))

    connection.close_if_health_check_failed()

    assert connection.health_check_done is True
    assert connection.connection.info.backend_pid == before  # kept


def test_a_connection_the_server_closed_is_replaced_before_the_first_query():
    connection.ensure_connection()
    before = connection.connection.info.backend_pid
    _drop_server_side()
    connection.health_check_done = False

    connection.close_if_health_check_failed()

    assert connection.connection is None  # found dead and closed
    assert UsageRecord.objects.count() == 0  # the next query opens a new one
    assert connection.connection.info.backend_pid != before


def test_a_request_after_the_server_closed_the_connection_succeeds(key_client, local_model):
    assert _generate(key_client, "before the drop", local_model.model).status_code == 200
    _drop_server_side()
    close_old_connections()  # what Django does at the start of every request

    response = _generate(key_client, "after the drop", local_model.model)

    assert response.status_code == 200, response.content
    assert UsageRecord.objects.filter(request_id=response.json()["request_id"]).exists()


def test_ledger_row_of_a_miss_survives_a_connection_lost_during_the_upstream_call(
    settings, key_client, local_model
):
    # The request's first query (the key) runs on a live connection; the server drops it
    # while the (simulated) upstream call is under way; the ledger INSERT then retries on a
    # new connection.
    settings.LOCAL_PROVIDER_LATENCY_MS = 400
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    killer = threading.Timer(0.2, _terminate, args=(pid,))
    killer.start()

    response = _generate(key_client, "dropped mid-call", local_model.model)
    killer.join()

    assert response.status_code == 200, response.content
    body = response.json()
    row = UsageRecord.objects.get(request_id=body["request_id"])
    assert (row.prompt_tokens, row.completion_tokens) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    assert connection.connection.info.backend_pid != pid


def test_a_query_on_a_connection_lost_after_the_check_is_503_not_500(key_client):
    assert key_client.get("/api/v1/usage").status_code == 200
    _drop_server_side()

    response = key_client.get("/api/v1/usage")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert "Traceback" not in response.content.decode()
    close_old_connections()  # what Django does at the end of every request
    assert key_client.get("/api/v1/usage").status_code == 200


def test_a_miss_served_while_the_ledger_refuses_writes_keeps_its_row(
    key_client, local_model, hidden_ledger
):
    # The key is loaded (and cached) by a first request, as on a busy worker.
    assert _generate(key_client, "warm", local_model.model).status_code == 200

    with hidden_ledger:
        response = _generate(key_client, "while the ledger is out of reach", local_model.model)

    assert response.status_code == 200, response.content  # served: it was paid upstream
    request_id = response.json()["request_id"]
    assert not UsageRecord.objects.filter(request_id=request_id).exists()
    assert usage_flush() == 1  # what the flusher does a second later
    row = UsageRecord.objects.get(request_id=request_id)
    assert row.prompt_tokens == response.json()["usage"]["prompt_tokens"]


@pytest.fixture
def unmigrated_database(api_key):
    """This thread's connection pointed at a new, empty PostgreSQL database (what a server
    finds before `migrate` has run); the test database again afterwards."""
    test_db = connection.settings_dict["NAME"]
    empty = sql.Identifier(f"{test_db}_unmigrated")
    with psycopg.connect(_dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(empty))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(empty))
    connection.close()
    connection.settings_dict["NAME"] = f"{test_db}_unmigrated"
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict["NAME"] = test_db
        with psycopg.connect(_dsn(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(empty))


@pytest.mark.usefixtures("unmigrated_database")
@pytest.mark.parametrize(
    "call",
    [
        ("get", "/api/v1/quota", None),
        ("get", "/api/v1/usage", None),
        ("post", "/api/v1/generate", {"prompt": "hello"}),
        ("post", "/v1/chat/completions", {"model": "local/demo", "messages": []}),
    ],
    ids=lambda call: f"{call[0]} {call[1]}",
)
@pytest.mark.parametrize("scheme", ["Bearer", "Token"])
def test_a_database_not_migrated_is_a_503_with_the_request_id_not_a_500(
    api_client, api_key, caplog, call, scheme
):
    credentials = api_key[0] if scheme == "Bearer" else "0" * 40
    api_client.credentials(HTTP_AUTHORIZATION=f"{scheme} {credentials}")
    method, path, body = call

    response = getattr(api_client, method)(path, body, format="json")

    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "service_unavailable"
    assert "migrat" in error["message"]
    assert error["request_id"] == response["X-Request-ID"]
    assert "Traceback" not in response.content.decode()
    assert "does not exist" not in response.content.decode()  # no SQL detail for a client
    logged = [r for r in caplog.records if r.name == "tollgate.errors"]
    assert [r.levelname for r in logged] == ["ERROR"]
    assert "does not exist" in logged[0].getMessage()  # the operator's log names the table


@pytest.mark.usefixtures("unmigrated_database")
def test_metrics_scrapes_of_a_database_not_migrated_log_one_line_naming_the_table(
    client, settings, caplog
):
    settings.METRICS_TOKEN = ""

    statuses = [client.get("/metrics").status_code for _ in range(3)]

    assert statuses == [200] * 3  # the scrape answers, without the shared quota gauges
    logged = [r for r in caplog.records if r.name == "health.gauges"]
    assert [(r.levelname, r.getMessage()) for r in logged] == [
        (
            "ERROR",
            "shared quota gauges not refreshed: database not migrated: "
            'relation "quotas_globallimits" does not exist',
        )
    ]
    assert not logged[0].exc_info  # one line, not a traceback


def test_a_database_a_migration_behind_the_code_is_a_503_not_a_500(key_client):
    # A column the code reads is not there yet: the code was deployed before `migrate`.
    def rename(old: str, new: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER TABLE quotas_apikey RENAME COLUMN "{old}" TO "{new}"')

    rename("scopes", "scopes_not_yet")
    try:
        response = key_client.get("/api/v1/quota")
    finally:
        rename("scopes_not_yet", "scopes")

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "service_unavailable"
    assert key_client.get("/api/v1/quota").status_code == 200


@contextlib.contextmanager
def database_unreachable() -> Iterator[None]:
    """This thread's connection pointed at a loopback port where no PostgreSQL listens (a
    server stopped, as bench/outage.py's postgres-stop drill does); back afterwards."""
    from config.errors import _database_away
    from config.tests.redis_server import free_port

    port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = str(free_port())
    _database_away.reset()
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port
        _database_away.reset()


@pytest.fixture
def unreachable_database(api_key):
    with database_unreachable():
        yield


@pytest.mark.usefixtures("unreachable_database")
def test_database_unreachable_is_logged_with_a_traceback_once_not_per_request(key_client, caplog):
    from config.errors import _database_away

    statuses = []
    for _ in range(5):
        statuses.append(key_client.get("/api/v1/usage").status_code)
        close_old_connections()  # what Django does at the end of every request
    _database_away._last -= _database_away.every  # the next report is due
    statuses.append(key_client.get("/api/v1/usage").status_code)

    assert statuses == [503] * 6
    logged = [r for r in caplog.records if r.name == "tollgate.errors"]
    assert [r.getMessage() for r in logged] == [
        "database unreachable: 1 requests answered 503 since the last such line",
        "database unreachable: 5 requests answered 503 since the last such line",
    ]
    assert all(r.exc_info for r in logged)


@contextlib.contextmanager
def database_refusing_connections() -> Iterator[None]:
    """The test database closed to every new connection and this thread's connection
    dropped, as during a PostgreSQL restart; the settings (and so the ledger spool's
    directory, which they name) stay as they are."""
    admin_dsn = _dsn().replace(f"dbname={connection.settings_dict['NAME']}", "dbname=postgres")
    name = sql.Identifier(connection.settings_dict["NAME"])
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        try:
            connection.ensure_connection()
            pid = connection.connection.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            connection.close()
            yield
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))
            connection.close()


def test_a_key_read_before_the_database_went_away_still_generates_its_row_kept(
    key_client, local_model, caplog
):
    # A busy worker has read the key (and its policy) a moment before PostgreSQL stops
    # (the first request of the process meets a new policy version, which empties the key
    # cache: the second reads the key again).
    for prompt in ("warm", "warmer"):
        assert _generate(key_client, prompt, local_model.model).status_code == 200
    time.sleep(1.1)  # past the second a key is read for: the outage meets a key to re-read

    with database_refusing_connections():
        answered = [_generate(key_client, f"away {i}", local_model.model) for i in range(3)]
        refused = key_client.get("/api/v1/usage")  # the ledger itself: nothing to serve

    assert [r.status_code for r in answered] == [200] * 3, answered[0].content
    assert refused.status_code == 503
    ids = [r.json()["request_id"] for r in answered]
    assert not UsageRecord.objects.filter(request_id__in=ids).exists()
    assert usage_flush() == 3  # the spool, written once the database is back
    assert UsageRecord.objects.filter(request_id__in=ids, outcome="ok").count() == 3
    kept = [r for r in caplog.records if r.getMessage().startswith("ledger rows kept")]
    assert len(kept) == 1  # the outage's start, not a line per row
    told = [r.getMessage() for r in caplog.records if "API keys" in r.getMessage()]
    assert told == [
        f"database unreachable: API keys read in the last "
        f"{settings.AUTH_DB_OUTAGE_GRACE_SECONDS:.0f} s are still accepted"
    ]


def test_a_key_whose_last_use_is_due_to_be_recorded_still_generates_while_the_database_is_away(
    key_client, api_key, local_model
):
    # The key was last recorded as used two minutes ago, and this worker last wrote it a
    # minute ago: the next request writes it again, and finds the database gone.
    from quotas.models import ApiKey
    from quotas.services import apikeys

    assert _generate(key_client, "warm", local_model.model).status_code == 200
    ApiKey.objects.filter(pk=api_key[1].pk).update(
        last_used_at=timezone.now() - timedelta(minutes=2)
    )
    assert _generate(key_client, "warmer", local_model.model).status_code == 200  # read again
    time.sleep(1.1)  # past the second a key is read for
    apikeys._last_touch.clear()  # a minute later

    with database_refusing_connections():
        response = _generate(key_client, "away", local_model.model)

    assert response.status_code == 200, response.content


def test_a_key_not_read_lately_gets_503_while_the_database_is_away(
    key_client, local_model, settings
):
    for prompt in ("warm", "warmer"):
        assert _generate(key_client, prompt, local_model.model).status_code == 200
    settings.AUTH_DB_OUTAGE_GRACE_SECONDS = 0  # as if read longer ago than the grace
    time.sleep(1.1)  # past the second a key is read for

    with database_refusing_connections():
        response = _generate(key_client, "away", local_model.model)

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "service_unavailable"


def test_connections_wait_for_a_lock_at_most_database_lock_timeout_ms():
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone() == ("3s",)  # DATABASE_LOCK_TIMEOUT_MS's default


def test_a_lock_held_on_the_ledger_does_not_hold_generation(key_client, local_model):
    # A migration's ALTER TABLE (or anyone's LOCK TABLE) on the ledger: the INSERT of a
    # served request gives up after DATABASE_LOCK_TIMEOUT_MS and its row waits in the spool,
    # instead of the request waiting for the lock.
    options = connection.settings_dict["OPTIONS"]
    saved = options.get("options")
    options["options"] = "-c lock_timeout=200"
    connection.close()
    try:
        for prompt in ("warm", "warmer"):  # the key and its policy read, as on a busy worker
            assert _generate(key_client, prompt, local_model.model).status_code == 200
        with psycopg.connect(_dsn()) as other:  # in a transaction until the block ends
            other.execute("LOCK TABLE quotas_usagerecord IN ACCESS EXCLUSIVE MODE")
            released = threading.Timer(10, other.rollback)  # a bound, should the test fail
            released.start()
            response = _generate(key_client, "while the ledger is locked", local_model.model)
            answered_while_locked = released.is_alive()
            released.cancel()
    finally:
        options["options"] = saved
        connection.close()

    assert response.status_code == 200, response.content
    assert answered_while_locked  # not after the lock was let go
    request_id = response.json()["request_id"]
    assert not UsageRecord.objects.filter(request_id=request_id).exists()
    assert usage_flush() == 1
    assert UsageRecord.objects.filter(request_id=request_id, outcome="ok").exists()


def test_metrics_scrapes_with_the_database_unreachable_log_one_line_until_it_is_back(
    client, settings, caplog, redis_conn
):
    settings.METRICS_TOKEN = ""

    with database_unreachable():
        statuses = [client.get("/metrics").status_code for _ in range(3)]
    statuses.append(client.get("/metrics").status_code)

    assert statuses == [200] * 4
    logged = [r for r in caplog.records if r.name == "health.gauges"]
    messages = [r.getMessage() for r in logged]
    assert len(messages) == 2, messages
    assert messages[0].startswith("shared quota gauges not refreshed: database unreachable: ")
    assert messages[1] == "shared quota gauges refreshed again"
    assert not any(r.exc_info for r in logged)
