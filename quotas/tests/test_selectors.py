from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal

import pytest

from config.errors import InvalidRequest
from quotas.models import ApiKey, UsageRecord
from quotas.selectors import usage_rows
from quotas.tests.factories import UserFactory

pytestmark = pytest.mark.django_db

_ids = itertools.count()
DAY1 = dt.date(2026, 3, 1)
DAY2 = dt.date(2026, 3, 2)


def _at(day: dt.date, hour: int = 12, minute: int = 0, second: int = 0, micro: int = 0):
    return dt.datetime.combine(day, dt.time(hour, minute, second, micro), tzinfo=dt.UTC)


def _record(
    user, *, at, model="local/demo", key=None, prompt=0, completion=0, cost="0", cached=False
):
    return UsageRecord.objects.create(
        request_id=f"req-{next(_ids)}",
        user=user,
        api_key=key,
        model=model,
        provider="local",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=Decimal(cost),
        cached=cached,
        created_at=at,
    )


def _key(user, prefix):
    return ApiKey.objects.create(user=user, prefix=prefix, secret_hash="0" * 64)


@pytest.fixture
def ledger():
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    key_a = _key(alice, "aaaaaaaa")
    # Day 1: alice pays 0.000001 + 0.000150 on local/demo with her key, one cache hit.
    _record(alice, at=_at(DAY1, 0, 0), key=key_a, prompt=10, completion=5, cost="0.000001")
    _record(alice, at=_at(DAY1, 13), key=key_a, prompt=100, completion=50, cost="0.000150")
    _record(alice, at=_at(DAY1, 14), key=key_a, cached=True)
    # Day 2, last microsecond: alice without a key on another model; bob on local/demo.
    _record(
        alice,
        at=_at(DAY2, 23, 59, 59, 999_999),
        model="local/big",
        prompt=1000,
        completion=2000,
        cost="1.234567",
    )
    _record(bob, at=_at(DAY2, 9), prompt=7, completion=3, cost="0.100000")
    # Outside the range on both sides.
    _record(alice, at=_at(DAY1, 0) - dt.timedelta(microseconds=1), prompt=1, cost="9")
    _record(alice, at=_at(DAY2 + dt.timedelta(days=1), 0), prompt=1, cost="9")
    return alice, bob


def test_usage_rows_by_day_sums_each_utc_day_and_excludes_the_edges(ledger):
    alice, _ = ledger

    body = usage_rows(user_id=alice.pk, start=DAY1, end=DAY2, group_by="day")

    assert body["rows"] == [
        {
            "group": "2026-03-01",
            "requests": 3,
            "cached": 1,
            "prompt_tokens": 110,
            "completion_tokens": 55,
            "cost_usd": "0.000151",
        },
        {
            "group": "2026-03-02",
            "requests": 1,
            "cached": 0,
            "prompt_tokens": 1000,
            "completion_tokens": 2000,
            "cost_usd": "1.234567",
        },
    ]
    assert body["totals"] == {
        "requests": 4,
        "cached": 1,
        "prompt_tokens": 1110,
        "completion_tokens": 2055,
        "cost_usd": "1.234718",
    }


def test_usage_rows_without_user_covers_every_user(ledger):
    body = usage_rows(user_id=None, start=DAY1, end=DAY2, group_by="user")

    assert [(row["group"], row["requests"], row["cost_usd"]) for row in body["rows"]] == [
        ("alice", 4, "1.234718"),
        ("bob", 1, "0.100000"),
    ]
    assert body["totals"]["cost_usd"] == "1.334718"
    assert body["totals"]["requests"] == 5


def test_usage_rows_by_model_groups_on_the_catalogue_name(ledger):
    body = usage_rows(user_id=None, start=DAY1, end=DAY2, group_by="model")

    assert [(row["group"], row["requests"], row["prompt_tokens"]) for row in body["rows"]] == [
        ("local/big", 1, 1000),
        ("local/demo", 4, 117),
    ]


def test_usage_rows_by_key_names_keys_and_puts_keyless_requests_last(ledger):
    alice, _ = ledger

    body = usage_rows(user_id=alice.pk, start=DAY1, end=DAY2, group_by="key")

    assert [(row["group"], row["requests"], row["cost_usd"]) for row in body["rows"]] == [
        ("tg_aaaaaaaa", 3, "0.000151"),
        (None, 1, "1.234567"),
    ]


def test_usage_rows_single_day_range_includes_its_last_microsecond(ledger):
    alice, _ = ledger

    body = usage_rows(user_id=alice.pk, start=DAY2, end=DAY2, group_by="day")

    assert body["totals"]["cost_usd"] == "1.234567"
    assert body["totals"]["requests"] == 1


def test_usage_rows_empty_range_has_zero_totals():
    body = usage_rows(user_id=None, start=DAY1, end=DAY2, group_by="model")

    assert body == {
        "rows": [],
        "totals": {
            "requests": 0,
            "cached": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": "0.000000",
        },
    }


def test_usage_rows_unknown_grouping_is_invalid_request():
    with pytest.raises(InvalidRequest) as excinfo:
        usage_rows(user_id=None, start=DAY1, end=DAY2, group_by="hour")
    assert "group_by" in excinfo.value.details["fields"]


def test_usage_rows_range_ending_before_start_is_invalid_request():
    with pytest.raises(InvalidRequest) as excinfo:
        usage_rows(user_id=None, start=DAY2, end=DAY1, group_by="day")
    assert "end" in excinfo.value.details["fields"]


def test_usage_rows_query_count_does_not_grow_with_rows(ledger, django_assert_num_queries):
    with django_assert_num_queries(2):
        usage_rows(user_id=None, start=DAY1, end=DAY2, group_by="key")
