"""The ledger's admin search: what it finds, and that PostgreSQL can answer it from indexes."""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.db import connection
from django.urls import reverse

from quotas.models import UsageRecord
from quotas.tests.factories import UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:quotas_usagerecord_changelist")


@pytest.fixture
def ledger():
    """Two users' rows; the ids are stored as the ledger stores a client's own:
    `<client id>.<12 hex>`."""
    carol, dave = UserFactory(username="carol"), UserFactory(username="dave")
    rows = {
        "order-42.0123456789ab": carol,
        "order-42.ba9876543210": dave,
        "order-420.00000000000a": dave,
        "re-order-42.111111111111": dave,
        "3f2a9c0d4b7e4e1f9a6b8c7d6e5f4a3b": carol,
    }
    UsageRecord.objects.bulk_create(
        UsageRecord(request_id=request_id, user=user, model="local/demo", provider="local")
        for request_id, user in rows.items()
    )
    return rows


def _found(admin_client, term: str) -> list[str]:
    response = admin_client.get(CHANGELIST, {"q": term})
    assert response.status_code == 200
    return sorted(r.request_id for r in response.context["cl"].result_list)


def test_ledger_search_by_full_request_id_finds_that_row(admin_client, ledger):
    assert _found(admin_client, "order-42.ba9876543210") == ["order-42.ba9876543210"]
    assert _found(admin_client, "3f2a9c0d4b7e4e1f9a6b8c7d6e5f4a3b") == [
        "3f2a9c0d4b7e4e1f9a6b8c7d6e5f4a3b"
    ]


def test_ledger_search_by_client_id_finds_the_rows_it_starts(admin_client, ledger):
    assert _found(admin_client, "order-42.") == ["order-42.0123456789ab", "order-42.ba9876543210"]
    # A start, not a part: "re-order-42..." holds the term but does not start with it.
    assert _found(admin_client, "order-42") == [
        "order-42.0123456789ab",
        "order-42.ba9876543210",
        "order-420.00000000000a",
    ]
    # Case counts in a request id: the client's id is kept as it was sent.
    assert _found(admin_client, "ORDER-42.") == []


def test_ledger_search_by_username_finds_that_users_rows_in_any_case(admin_client, ledger):
    carols = ["3f2a9c0d4b7e4e1f9a6b8c7d6e5f4a3b", "order-42.0123456789ab"]
    assert _found(admin_client, "carol") == carols
    assert _found(admin_client, "CARO") == carols
    assert _found(admin_client, "nobody") == []


def test_ledger_search_words_must_all_match(admin_client, ledger):
    assert _found(admin_client, "dave order-42") == [
        "order-42.ba9876543210",
        "order-420.00000000000a",
    ]
    assert _found(admin_client, '"order-42.ba9876543210"') == ["order-42.ba9876543210"]


def test_ledger_search_is_answered_from_indexes_not_a_scan_of_the_ledger(rf, admin_user, ledger):
    request = rf.get(CHANGELIST, {"q": "carol"})
    request.user = admin_user
    model_admin = admin.site.get_model_admin(UsageRecord)
    searched, may_have_duplicates = model_admin.get_search_results(
        request, model_admin.get_queryset(request), "carol"
    )
    with connection.cursor() as cursor:
        # A table of five rows is read whole whatever the indexes: make that the last
        # resort, so that the plan shows whether each condition has an index to use.
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = searched.order_by().explain()

    assert not may_have_duplicates
    assert "Seq Scan on quotas_usagerecord" not in plan
    assert "BitmapOr" in plan
    # The request id's start is a range of an index (the pattern one under a non-C
    # collation: `~>=~`), the user's rows are a look-up by user_id.
    assert re.search(r"Index Cond: \(\(\(request_id\)::text ~?>=~? 'carol'::text\)", plan), plan
    assert f"Index Cond: (user_id = {ledger['order-42.0123456789ab'].pk})" in plan
