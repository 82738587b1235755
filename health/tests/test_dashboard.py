from __future__ import annotations

import datetime as dt
import re
import time
from decimal import Decimal

import pytest
from django.utils import timezone

from health import selectors
from quotas.models import DailyUsage, DenialCount, GlobalLimits, UsageRecord
from quotas.tests.factories import PlanFactory, UserFactory, UserQuotaFactory

pytestmark = pytest.mark.django_db


def _row(
    n: int,
    *,
    user,
    at: dt.datetime,
    cost: str = "0",
    cached: bool = False,
    prompt: int = 0,
    completion: int = 0,
) -> UsageRecord:
    return UsageRecord(
        request_id=f"seed-{user.pk}-{at.timestamp()}-{n}",
        user=user,
        model="local/demo",
        provider="local",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=Decimal(cost),
        cached=cached,
        created_at=at,
    )


@pytest.fixture
def seeded(redis_conn):
    """Today: alice spends $0.90 of a $1.00 day budget in 3 requests (1 from cache), bob
    $0.10 without a budget; 5 days ago: 4 requests in the ledger; 10 days ago: rolled up."""
    now = timezone.now()
    today = now.date()
    pro = PlanFactory(name="pro", cost_per_day=Decimal("1.00"), cost_per_month=Decimal("20.00"))
    alice = UserQuotaFactory(user=UserFactory(username="alice"), plan=pro).user
    bob = UserFactory(username="bob")
    start = dt.datetime.combine(today, dt.time.min, tzinfo=dt.UTC)
    rows = [
        _row(
            1,
            user=alice,
            at=start + dt.timedelta(seconds=1),
            cost="0.50",
            prompt=100,
            completion=50,
        ),
        _row(
            2, user=alice, at=start + dt.timedelta(seconds=2), cost="0.40", prompt=80, completion=20
        ),
        _row(3, user=alice, at=start + dt.timedelta(seconds=3), cached=True),
        _row(
            4, user=bob, at=start + dt.timedelta(seconds=4), cost="0.10", prompt=10, completion=10
        ),
    ]
    five_days_ago = start - dt.timedelta(days=5)
    rows += [
        _row(10 + i, user=bob, at=five_days_ago + dt.timedelta(minutes=i), cost="0.01")
        for i in range(4)
    ]
    # Outside the 30-day window: must not be counted anywhere.
    rows.append(_row(99, user=bob, at=start - dt.timedelta(days=45), cost="9.99"))
    UsageRecord.objects.bulk_create(rows)
    DailyUsage.objects.create(
        day=today - dt.timedelta(days=10),
        user=bob,
        model="local/demo",
        provider="local",
        requests=7,
        cached=2,
        prompt_tokens=70,
        completion_tokens=30,
        cost_usd=Decimal("0.07"),
    )
    limits = GlobalLimits.load()
    limits.requests_per_hour = 500
    limits.save()
    DenialCount.objects.create(day=today, scope="user", dimension="requests_per_minute", count=3)
    DenialCount.objects.create(
        day=today - dt.timedelta(days=1), scope="key", dimension="cost_per_day", count=8
    )
    # An open circuit as the generation app's breaker records it in Redis.
    redis_conn.hset(
        "tg:cb:openai:gpt-test", mapping={"state": "open", "failures": 5, "opened_at": time.time()}
    )
    return {"today": today, "alice": alice, "bob": bob}


def test_series_takes_rolled_up_days_and_sums_the_rest_from_the_ledger(seeded):
    today = seeded["today"]
    series = selectors.daily_series(today=today)
    assert len(series) == 30
    assert series[-1].day == today
    assert series[0].day == today - dt.timedelta(days=29)
    by_day = {d.day: d for d in series}
    assert by_day[today].requests == 4
    assert by_day[today].cached == 1
    assert by_day[today].tokens == 270
    assert by_day[today].cost_usd == Decimal("1.00")
    assert by_day[today - dt.timedelta(days=5)].requests == 4
    assert by_day[today - dt.timedelta(days=10)].requests == 7
    assert by_day[today - dt.timedelta(days=10)].cost_usd == Decimal("0.07")
    assert sum(d.requests for d in series) == 15


def test_top_users_show_spend_against_effective_budget(seeded):
    top = selectors.top_users_by_cost(today=seeded["today"])
    assert [u.username for u in top] == ["alice", "bob"]
    alice, bob = top
    assert alice.plan == "pro"
    assert alice.cost_today == Decimal("0.90")
    assert alice.budget_day == Decimal("1.00")
    assert alice.day_use == pytest.approx(0.9)
    assert alice.month_use == pytest.approx(0.045)
    assert bob.budget_day is None
    assert bob.day_use is None


def test_denials_are_today_only_most_frequent_first(seeded):
    assert selectors.denials_by_reason(today=seeded["today"]) == [
        ("user", "requests_per_minute", 3)
    ]


def test_dashboard_renders_seeded_data_for_staff(client, admin_user, seeded):
    client.force_login(admin_user)
    response = client.get("/admin/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    assert re.search(r'id="today-requests">\s*4\s*<', html)
    assert re.search(r'id="today-tokens">\s*270\s*<', html)
    assert "$1.0000" in html
    assert re.search(r'id="today-hit-rate">\s*25.0%', html)
    top = html[html.index('id="top-users"') : html.index("</table>", html.index('id="top-users"'))]
    assert top.index("alice") < top.index("bob")
    assert "90.0% of $1.00" in top
    assert "unlimited" in top
    denials = html[html.index('id="denials"') :]
    assert "requests_per_minute" in denials[: denials.index("</table>")]
    assert "cost_per_day" not in denials[: denials.index("</table>")]
    circuits = html[html.index('id="circuits"') :]
    assert "openai:gpt-test" in circuits[: circuits.index("</table>")]
    shared = html[html.index('id="shared-quotas"') :]
    shared = shared[: shared.index("</table>")]
    assert re.search(r"<td>global</td><td>requests_per_hour</td><td>500</td>", shared)
    # Three charts of 30 days each, drawn inline; no script and nothing from another origin.
    assert html.count("<svg") >= 3
    assert html.count('class="dashboard-bar"') == 90
    assert "<script" not in html.split('id="dashboard"')[1]
    assert not re.search(r'(src|href)="https?://', html)
    assert "default-src 'self'" in response["Content-Security-Policy"]


def test_dashboard_renders_with_no_data(client, admin_user, redis_conn):
    client.force_login(admin_user)
    response = client.get("/admin/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "No spend recorded today." in html
    assert "No refusals today." in html
    assert "All circuits closed." in html
    assert "No global or provider limit is set." in html
    assert re.search(r'id="today-hit-rate">\s*n/a', html)


def test_admin_index_links_to_the_dashboard(client, admin_user):
    client.force_login(admin_user)
    html = client.get("/admin/").content.decode()
    assert 'href="/admin/dashboard/"' in html


def test_dashboard_renders_from_the_ledger_with_redis_down(client, admin_user, seeded, settings):
    from quotas.services import local_state_reset

    closed = "redis://127.0.0.1:1/3"
    settings.REDIS_URL = closed
    settings.CACHES = {
        **settings.CACHES,
        "default": {**settings.CACHES["default"], "LOCATION": closed},
    }
    local_state_reset()
    client.force_login(admin_user)
    response = client.get("/admin/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    assert re.search(r'id="today-requests">\s*4\s*<', html)
    assert "Live counters unavailable." in html
    assert "Live quota counters are unavailable" in html
    # Persisted refusal counts still show.
    assert "requests_per_minute" in html[html.index('id="denials"') :]
