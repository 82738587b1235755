"""Migrations of the ledger, a table of millions of rows that takes a row per request."""

from __future__ import annotations

import io

import pytest
from django.contrib.postgres.operations import AddIndexConcurrently
from django.core.management import call_command
from django.db.migrations import AddIndex
from django.db.migrations.loader import MigrationLoader

# Shipped before this rule: 0003 built `usage_pending` with a plain CREATE INDEX (a SHARE
# lock on the ledger, 0.26-0.35 s at two million rows), 0004 rewrites the table anyway
# (README, "Deployment").
SHIPPED = {"0001_initial", "0002_rollups", "0003_usage_pending_index", "0004_exact_cost"}


def test_indexes_added_to_the_ledger_are_built_concurrently():
    # A plain CREATE INDEX holds every ledger write (each request's INSERT, spooled after
    # LEDGER_WRITE_TIMEOUT_MS) for as long as it reads the whole ledger.
    loader = MigrationLoader(None, ignore_no_migrations=True)
    added = [
        (name, migration, op)
        for (app, name), migration in loader.disk_migrations.items()
        if app == "quotas" and name not in SHIPPED
        for op in migration.operations
        if isinstance(op, AddIndex) and op.model_name == "usagerecord"
    ]
    assert added  # 0005 at least
    for name, migration, op in added:
        assert isinstance(op, AddIndexConcurrently), name
        assert not migration.atomic, name


@pytest.mark.django_db(transaction=True)  # CONCURRENTLY: outside a transaction
def test_the_unusual_rows_index_is_built_concurrently_on_postgresql():
    out = io.StringIO()
    call_command("sqlmigrate", "quotas", "0005", stdout=out)
    assert 'CREATE INDEX CONCURRENTLY "usage_unusual"' in out.getvalue()
