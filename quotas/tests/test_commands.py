from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import shlex
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from quotas import keys
from quotas.models import ApiKey, ModelPrice, Plan, UsageRecord, UserQuota
from quotas.tests.factories import UserFactory

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"tg_[a-z0-9]{8}_[A-Za-z0-9_-]{32,128}")


def _run(name: str, *args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _stored_anywhere(text: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for (table,) in cursor.fetchall():
            cursor.execute(
                f'SELECT 1 FROM "{table}" AS t WHERE t::text LIKE %s LIMIT 1',  # noqa: S608
                [f"%{text}%"],
            )
            if cursor.fetchone():
                return True
    return False


# --- create_api_key ---


def test_create_api_key_prints_the_key_alone_and_stores_only_its_hash(user):
    out, err = _run("create_api_key", user.username)

    full_key = out.strip()
    assert KEY_RE.fullmatch(full_key)
    prefix, secret = keys.key_parse(full_key)
    key = ApiKey.objects.get(prefix=prefix)
    assert key.user == user
    assert keys.secret_matches(secret, key.secret_hash)
    assert (key.scopes, key.expires_at, key.name) == ([], None, "")
    assert f"tg_{prefix}" in err
    assert secret not in err
    assert not _stored_anywhere(secret)


def test_create_api_key_with_name_scopes_and_expiry(user, api_client, local_model):
    before = timezone.now()

    out, _ = _run(
        "create_api_key",
        user.username,
        "--name",
        "ci",
        "--scopes",
        "generate, model:local/demo",
        "--expires-in-days",
        "7",
    )

    key = ApiKey.objects.get(prefix=keys.key_parse(out.strip())[0])
    assert key.name == "ci"
    assert key.scopes == ["generate", "model:local/demo"]
    assert before + dt.timedelta(days=7) <= key.expires_at <= timezone.now() + dt.timedelta(days=7)
    response = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {out.strip()}")
    assert response.status_code == 200
    assert response.json()["user"] == user.username


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody",), "No user named 'nobody'"),
        (("{user}", "--expires-in-days", "0"), "--expires-in-days must be between"),
        (("{user}", "--expires-in-days", "-3"), "--expires-in-days must be between"),
        (("{user}", "--expires-in-days", "soon"), "invalid int value"),
        (("{user}", "--scopes", "generate, two words"), "is not a valid scope"),
        (("{user}", "--name", "x" * 101), "--name is at most 100"),
    ],
)
def test_create_api_key_bad_input_is_a_command_error_and_creates_nothing(user, args, message):
    args = tuple(arg.format(user=user.username) for arg in args)

    with pytest.raises(CommandError, match=re.escape(message)):
        _run("create_api_key", *args)
    assert ApiKey.objects.count() == 0


def test_create_api_key_refuses_a_model_scope_outside_the_catalogue(user, local_model):
    # A key scoped to a misspelt model may call no model at all: said now, not by its 403s.
    with pytest.raises(CommandError, match=re.escape("model:local/dmeo")):
        _run("create_api_key", user.username, "--scopes", "generate, model:local/dmeo")
    assert ApiKey.objects.count() == 0


def test_create_api_key_refuses_an_inactive_user():
    UserFactory(username="gone", is_active=False)

    with pytest.raises(CommandError, match="inactive"):
        _run("create_api_key", "gone")
    assert ApiKey.objects.count() == 0


# --- seed_demo ---


def _printed_key(out: str) -> str:
    keys_found = set(KEY_RE.findall(out))
    assert len(keys_found) == 1, out
    return keys_found.pop()


def test_seed_demo_creates_plans_user_model_and_a_working_key(api_client, redis_conn):
    out, _ = _run("seed_demo")

    demo, free = Plan.objects.get(name="demo"), Plan.objects.get(name="free")
    assert demo.requests_per_minute == 60
    assert free.requests_per_minute is not None
    user = get_user_model().objects.get(username="demo")
    assert not user.has_usable_password()
    assert UserQuota.objects.get(user=user).plan == demo
    price = ModelPrice.objects.get(model="local/demo")
    assert (price.provider, price.upstream_model, price.enabled) == ("local", "demo", True)
    assert Decimal(0) < price.input_per_million < Decimal(10)

    full_key = _printed_key(out)
    curl = next(line for line in out.splitlines() if line.strip().startswith("curl"))
    words = shlex.split(curl)
    assert "http://127.0.0.1:8000/api/v1/generate" in words
    assert f"Authorization: Bearer {full_key}" in words
    assert json.loads(words[words.index("-d") + 1])["model"] == "local/demo"
    standing = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {full_key}")
    assert standing.status_code == 200
    assert standing.json()["plan"] == "demo"
    assert standing.json()["limits"]["requests_per_minute"]["limit"] == 60


def test_seed_demo_again_keeps_the_data_and_prints_a_new_key():
    first, _ = _run("seed_demo")
    Plan.objects.filter(name="demo").update(requests_per_minute=99)
    counts = (
        Plan.objects.count(),
        get_user_model().objects.count(),
        ModelPrice.objects.count(),
        UserQuota.objects.count(),
    )

    second, _ = _run("seed_demo")

    assert _printed_key(first) != _printed_key(second)
    assert (
        Plan.objects.count(),
        get_user_model().objects.count(),
        ModelPrice.objects.count(),
        UserQuota.objects.count(),
    ) == counts
    assert Plan.objects.get(name="demo").requests_per_minute == 99
    assert ApiKey.objects.filter(user__username="demo").count() == 2
    assert "already there" in second


def test_seed_demo_base_url_goes_into_the_curl_line():
    out, _ = _run("seed_demo", "--base-url", "http://localhost:9000/")

    assert "http://localhost:9000/api/v1/generate" in out


# --- usage_report ---


@pytest.fixture
def ledger(db):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    day = dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)
    rows = [
        (alice, day, "local/demo", 10, 5, "0.000015", False),
        (alice, day, "local/demo", 0, 0, "0", True),
        (bob, day, "local/big", 100, 200, "1.000001", False),
        (bob, day + dt.timedelta(days=1), "local/big", 1, 1, "5", False),
    ]
    for n, (user, at, model, prompt, completion, cost, cached) in enumerate(rows):
        UsageRecord.objects.create(
            request_id=f"report-{n}",
            user=user,
            model=model,
            provider="local",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=Decimal(cost),
            cached=cached,
            created_at=at,
        )


def test_usage_report_table_has_a_row_per_user_and_a_total(ledger):
    out, _ = _run("usage_report", "--date", "2026-03-01")

    lines = out.splitlines()
    assert lines[0] == "Usage on 2026-03-01 (UTC), by user"
    assert lines[1].split() == [
        "user",
        "requests",
        "cached",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ]
    assert lines[3].split() == ["alice", "2", "1", "10", "5", "0.000015"]
    assert lines[4].split() == ["bob", "1", "0", "100", "200", "1.000001"]
    assert lines[5].split() == ["TOTAL", "3", "1", "110", "205", "1.000016"]


def test_usage_report_csv_parses_back(ledger):
    out, _ = _run("usage_report", "--date", "2026-03-01", "--format", "csv", "--group-by", "model")

    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows == [
        {
            "model": "local/big",
            "requests": "1",
            "cached": "0",
            "prompt_tokens": "100",
            "completion_tokens": "200",
            "cost_usd": "1.000001",
        },
        {
            "model": "local/demo",
            "requests": "2",
            "cached": "1",
            "prompt_tokens": "10",
            "completion_tokens": "5",
            "cost_usd": "0.000015",
        },
    ]


def test_usage_report_json_has_the_api_shape(ledger):
    out, _ = _run("usage_report", "--date", "2026-03-02", "--format", "json")

    report = json.loads(out)
    assert report["date"] == "2026-03-02"
    assert report["rows"] == [
        {
            "group": "bob",
            "requests": 1,
            "cached": 0,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "cost_usd": "5.000000",
        },
    ]
    assert report["totals"]["cost_usd"] == "5.000000"


def test_usage_report_defaults_to_today_in_utc(db):
    UsageRecord.objects.create(
        request_id="today-1",
        user=UserFactory(username="dora"),
        model="local/demo",
        provider="local",
        cost_usd=Decimal("0.5"),
    )

    out, _ = _run("usage_report", "--format", "json")

    report = json.loads(out)
    assert report["date"] == dt.datetime.now(dt.UTC).date().isoformat()
    assert [row["group"] for row in report["rows"]] == ["dora"]


def test_usage_report_empty_day_says_so(db):
    out, _ = _run("usage_report", "--date", "2026-01-01")

    assert "(no requests)" in out
    assert out.splitlines()[-1].split() == ["TOTAL", "0", "0", "0", "0", "0.000000"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--date", "2026-13-01"), "Not a date"),
        (("--date", "yesterday"), "Not a date"),
        (("--format", "xml"), "invalid choice"),
    ],
)
def test_usage_report_bad_input_is_a_command_error(db, args, message):
    with pytest.raises(CommandError, match=message):
        _run("usage_report", *args)


def test_rebuild_counters_without_redis_says_it_cannot_reach_the_servers_counters(settings):
    settings.REDIS_URL = ""

    with pytest.raises(CommandError, match="REDIS_URL is not set"):
        call_command("rebuild_counters", stdout=io.StringIO())
