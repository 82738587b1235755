"""deploy/backup: a real pg_dump of the test database restored into a fresh database on
the local PostgreSQL, compared row by row."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from quotas.models import Outcome, UsageRecord
from quotas.tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(settings.BASE_DIR)
BACKUP = ROOT / "deploy/backup/backup.sh"
RESTORE = ROOT / "deploy/backup/restore.sh"
LEDGER = "SELECT * FROM quotas_usagerecord ORDER BY id"


def server_url(dbname: str) -> str:
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{dbname}"


def drop_database(name: str) -> None:
    with psycopg.connect(server_url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rows(url: str, query: str = LEDGER) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def restore_target():
    name = f"{settings.DATABASES['default']['NAME']}_restore"[:63]
    drop_database(name)
    yield name
    drop_database(name)


@pytest.fixture
def ledger_rows():
    if not shutil.which("pg_dump"):
        pytest.fail("the PostgreSQL client tools (pg_dump, pg_restore, psql) are required")
    users = [UserFactory(), UserFactory()]
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=uuid.uuid4().hex,
            user=users[i % 2],
            model="local/demo",
            provider="local",
            prompt_tokens=i * 3,
            completion_tokens=i * 5,
            cost_usd=Decimal(i) / Decimal(1000007),
            cached=i % 7 == 0,
            outcome=Outcome.UPSTREAM_TIMEOUT if i % 11 == 0 else Outcome.OK,
            latency_ms=i,
            created_at=start + dt.timedelta(minutes=i),
        )
        for i in range(500)
    )
    connection.close()  # nothing of ours holds the test database open during the dump


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin,
        env={**os.environ, **env},
    )


def test_backup_then_restore_into_fresh_database_has_identical_ledger(
    ledger_rows, restore_target, tmp_path
):
    source = server_url(settings.DATABASES["default"]["NAME"])
    backup = run(str(BACKUP), source, BACKUP_DIR=str(tmp_path))
    assert backup.returncode == 0, backup.stderr
    dump = Path(backup.stdout.strip().splitlines()[-1])
    assert dump.exists()
    assert dump.with_suffix(".sha256").exists()
    manifest = dump.with_suffix(".manifest").read_text()
    assert "public.quotas_usagerecord\t500" in manifest.splitlines()

    target = server_url(restore_target)
    restored = run(str(RESTORE), "--yes", "--create", str(dump), target)
    assert restored.returncode == 0, restored.stderr
    assert "verified" in restored.stderr

    original = rows(source)
    assert len(original) == 500
    assert rows(target) == original
    assert rows(target, "SELECT count(*), sum(cost_usd) FROM quotas_usagerecord") == rows(
        source, "SELECT count(*), sum(cost_usd) FROM quotas_usagerecord"
    )
    assert rows(target, "SELECT app, name FROM django_migrations ORDER BY id") == rows(
        source, "SELECT app, name FROM django_migrations ORDER BY id"
    )


def test_backup_and_restore_take_the_applications_database_url_with_djangos_parameters(
    ledger_rows, restore_target, tmp_path
):
    # README: a `?conn_max_age=` in DATABASE_URL sets Django's CONN_MAX_AGE. The scripts get
    # that same URL (compose's backup service passes the app's DATABASE_URL as it is), and
    # libpq refuses a parameter it does not know; its own ones (sslmode) still apply.
    django_only = "?conn_max_age=60&CONN_HEALTH_CHECKS=true&sslmode=disable"
    source = server_url(settings.DATABASES["default"]["NAME"])
    backup = run(str(BACKUP), BACKUP_DIR=str(tmp_path), DATABASE_URL=source + django_only)
    assert backup.returncode == 0, backup.stderr
    dump = Path(backup.stdout.strip().splitlines()[-1])

    target = server_url(restore_target)
    restored = run(str(RESTORE), "--yes", "--create", str(dump), target + django_only)
    assert restored.returncode == 0, restored.stderr
    assert "verified" in restored.stderr
    assert rows(target) == rows(source)

    refused = run(str(BACKUP), source + "?sslmode=nonsense", BACKUP_DIR=str(tmp_path))
    assert refused.returncode != 0  # libpq's own parameters are passed on, not dropped
    assert "sslmode" in refused.stderr


def test_restore_asks_for_confirmation_and_refuses_a_corrupt_archive(
    ledger_rows, restore_target, tmp_path
):
    backup = run(
        str(BACKUP), server_url(settings.DATABASES["default"]["NAME"]), BACKUP_DIR=str(tmp_path)
    )
    assert backup.returncode == 0, backup.stderr
    dump = Path(backup.stdout.strip().splitlines()[-1])
    target = server_url(restore_target)

    unconfirmed = run(str(RESTORE), "--create", str(dump), target, stdin="")
    assert unconfirmed.returncode == 3
    assert "not confirmed" in unconfirmed.stderr
    missing = run(str(RESTORE), "--yes", str(dump), target)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr

    with dump.open("ab") as fh:
        fh.write(b"tampered")
    corrupt = run(str(RESTORE), "--yes", "--create", str(dump), target)
    assert corrupt.returncode == 1
    assert "checksum" in corrupt.stderr
    with psycopg.connect(server_url("postgres")) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [restore_target]
        ).fetchone()
    assert exists is None


def test_restore_verification_fails_when_target_differs_from_backup(
    ledger_rows, restore_target, tmp_path
):
    backup = run(
        str(BACKUP), server_url(settings.DATABASES["default"]["NAME"]), BACKUP_DIR=str(tmp_path)
    )
    assert backup.returncode == 0, backup.stderr
    dump = Path(backup.stdout.strip().splitlines()[-1])
    target = server_url(restore_target)
    with psycopg.connect(server_url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{restore_target}"')
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE left_over (id int)")
        conn.execute("INSERT INTO left_over VALUES (1)")

    restored = run(str(RESTORE), "--yes", str(dump), target)

    assert restored.returncode == 4
    assert "VERIFICATION FAILED" in restored.stderr
    assert "public.left_over" in restored.stderr


def test_backup_retention_prunes_old_dumps_but_keeps_the_newest(ledger_rows, tmp_path):
    source = server_url(settings.DATABASES["default"]["NAME"])
    old = tmp_path / "tollgate-20200101T000000Z"
    for suffix in (".dump", ".manifest", ".sha256"):
        path = old.with_suffix(suffix)
        path.write_text("old")
        os.utime(path, (0, 0))

    kept = run(str(BACKUP), source, BACKUP_DIR=str(tmp_path), BACKUP_KEEP_MIN="3")
    assert kept.returncode == 0, kept.stderr
    assert old.with_suffix(".dump").exists()  # fewer than KEEP_MIN backups: nothing pruned

    pruned = run(
        str(BACKUP),
        source,
        BACKUP_DIR=str(tmp_path),
        BACKUP_KEEP_MIN="1",
        BACKUP_RETENTION_DAYS="7",
    )
    assert pruned.returncode == 0, pruned.stderr
    assert not old.with_suffix(".dump").exists()
    assert not old.with_suffix(".manifest").exists()
    assert len(list(tmp_path.glob("tollgate-*.dump"))) >= 1
