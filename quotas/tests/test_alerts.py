from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.db import connection

from config.tests.celery_fixtures import celery_worker  # noqa: F401
from config.tests.waiting import wait_until
from quotas.alerts import budget_alerts_check
from quotas.models import Outcome, UsageRecord, UserQuota
from quotas.rollups import BudgetAlert, DailyUsage, usage_rollup
from quotas.tasks import budget_alerts_check as budget_alerts_task
from quotas.tasks import usage_rollup as usage_rollup_task
from quotas.tests.factories import PlanFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.UTC)


def ledger(user, cost: str, *, when: dt.datetime = NOW, model: str = "local/demo", **fields):
    return UsageRecord.objects.create(
        request_id=uuid.uuid4().hex,
        user=user,
        model=model,
        provider="local",
        cost_usd=Decimal(cost),
        created_at=when,
        **fields,
    )


class WebhookReceiver:
    """A real HTTP server on loopback that records the JSON bodies posted to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/budget"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(settings):
    receiver = WebhookReceiver()
    settings.BUDGET_ALERT_WEBHOOK_URL = receiver.url
    yield receiver
    receiver.close()


def _day_alert_at_80(user, spent: str, **fields) -> BudgetAlert:
    """The 80% alert of `user`'s 1.00 USD day budget, as a check creates it."""
    return BudgetAlert.objects.create(
        user=user,
        period="day",
        period_start=NOW.date(),
        threshold=80,
        budget_usd=Decimal("1.00"),
        spent_usd=Decimal(spent),
        **fields,
    )


def test_rollup_sums_ledger_per_day_user_and_model_and_is_idempotent():
    alice, bob = UserFactory(), UserFactory()
    yesterday = NOW - dt.timedelta(days=1)
    ledger(alice, "0.100000", prompt_tokens=10, completion_tokens=20)
    ledger(alice, "0.000000", cached=True)
    ledger(alice, "0.000000", outcome=Outcome.UPSTREAM_TIMEOUT)
    ledger(alice, "0.250000", model="local/other", prompt_tokens=5, completion_tokens=5)
    ledger(bob, "0.300000", prompt_tokens=1, completion_tokens=2)
    ledger(alice, "9.000000", when=yesterday)

    assert usage_rollup(day=NOW.date()) == 3
    assert usage_rollup(day=NOW.date()) == 3

    rows = DailyUsage.objects.filter(day=NOW.date())
    assert rows.count() == 3
    demo = rows.get(user=alice, model="local/demo")
    assert (demo.requests, demo.cached, demo.errors) == (3, 1, 1)
    assert (demo.prompt_tokens, demo.completion_tokens) == (10, 20)
    assert demo.cost_usd == Decimal("0.100000")
    assert rows.get(user=alice, model="local/other").cost_usd == Decimal("0.250000")
    assert rows.get(user=bob).cost_usd == Decimal("0.300000")
    assert not DailyUsage.objects.filter(day=yesterday.date()).exists()


@pytest.mark.usefixtures("celery_worker")
def test_rollup_task_through_worker_rolls_up_today():
    user = UserFactory()
    ledger(user, "0.500000", when=dt.datetime.now(dt.UTC))
    usage_rollup_task.delay()
    row = wait_until(lambda: DailyUsage.objects.filter(user=user).first())
    assert row.cost_usd == Decimal("0.500000")
    assert row.day == dt.datetime.now(dt.UTC).date()


def _late_day(today: dt.date) -> dt.date:
    """Two days or more before `today`, in the same month as the day after it."""
    day = today - dt.timedelta(days=2)
    return day if (day + dt.timedelta(days=1)).day != 1 else day - dt.timedelta(days=1)


@pytest.mark.usefixtures("redis_conn")
def test_rollup_task_rolls_up_again_an_earlier_day_that_gets_a_late_row():
    plan = PlanFactory(cost_per_month=Decimal("10.00"))
    user = UserFactory()
    UserQuota.objects.create(user=user, plan=plan)
    late_day = _late_day(dt.datetime.now(dt.UTC).date())
    served = dt.datetime.combine(late_day, dt.time(12), tzinfo=dt.UTC)
    ledger(user, "5.000000", when=served)
    usage_rollup(day=late_day)  # beat's roll-ups of that day, while it was today
    usage_rollup_task()  # and its periodic runs since
    usage_rollup_task()
    # Days later, a worker's spool is replayed: a row of a request served on that day.
    ledger(user, "3.500000", when=served + dt.timedelta(hours=1))

    usage_rollup_task()

    row = DailyUsage.objects.get(day=late_day, user=user)
    assert (row.requests, row.cost_usd) == (2, Decimal("8.500000"))
    alerts = budget_alerts_check(now=served + dt.timedelta(days=1))
    assert [(a.period, a.threshold, a.spent_usd) for a in alerts] == [
        ("month", 80, Decimal("8.500000"))
    ]


@pytest.mark.usefixtures("redis_conn")
def test_rollup_task_rolls_up_the_days_it_missed_while_beat_was_down():
    user = UserFactory()
    today = dt.datetime.now(dt.UTC).date()
    usage_rollup_task()
    # Beat stopped for three days; the ledger went on.
    for back in (4, 3, 2):
        ledger(
            user,
            "1.250000",
            when=dt.datetime.combine(today, dt.time(9), tzinfo=dt.UTC) - dt.timedelta(days=back),
        )

    usage_rollup_task()

    rolled = dict(DailyUsage.objects.filter(user=user).values_list("day", "cost_usd"))
    assert rolled == {today - dt.timedelta(days=back): Decimal("1.250000") for back in (4, 3, 2)}


@pytest.mark.usefixtures("celery_worker")
def test_budget_alert_through_worker_fires_once_per_threshold(webhook, settings):
    settings.BUDGET_ALERT_EMAILS = ["ops@example.com"]
    user = UserFactory(email="alice@example.com")
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    now = dt.datetime.now(dt.UTC)
    ledger(user, "0.850000", when=now)

    budget_alerts_task.delay()
    wait_until(lambda: BudgetAlert.objects.filter(user=user, email_sent=True).exists())
    budget_alerts_task.delay()
    budget_alerts_task.delay()
    # The two later checks have run once a later marker task has (one solo worker, FIFO).
    marker = ledger(user, "0.000000", when=now)
    usage_rollup_task.delay()
    wait_until(lambda: DailyUsage.objects.filter(user=user, requests=2).exists())
    marker.delete()

    alert = BudgetAlert.objects.get(user=user)
    assert (alert.period, alert.threshold) == ("day", 80)
    assert alert.period_start == now.date()
    assert alert.spent_usd == Decimal("0.850000")
    assert alert.webhook_sent
    assert alert.email_sent
    assert alert.delivery_error == ""
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["alice@example.com", "ops@example.com"]
    assert "80%" in mail.outbox[0].subject
    assert len(webhook.bodies) == 1
    assert webhook.bodies[0]["threshold_percent"] == 80
    assert webhook.bodies[0]["spent_usd"] == "0.850000"
    assert webhook.bodies[0]["user"] == user.username

    ledger(user, "0.200000", when=now)
    budget_alerts_task.delay()
    wait_until(lambda: BudgetAlert.objects.filter(user=user, threshold=100).exists())
    assert BudgetAlert.objects.filter(user=user).count() == 2
    wait_until(lambda: len(webhook.bodies) == 2)
    assert webhook.bodies[1]["threshold_percent"] == 100


def test_budget_alert_concurrent_checks_create_exactly_one(transactional_db):
    user = UserFactory()
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "0.900000")
    created: list[int] = []
    barrier = threading.Barrier(6)

    def check():
        try:
            barrier.wait()
            created.append(len(budget_alerts_check(now=NOW)))
        finally:
            connection.close()

    threads = [threading.Thread(target=check) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [0, 0, 0, 0, 0, 1]
    assert BudgetAlert.objects.filter(user=user).count() == 1
    assert len(mail.outbox) == 1


def test_budget_alert_month_budget_counts_earlier_days_from_rollup():
    plan = PlanFactory(cost_per_month=Decimal("10.00"))
    user = UserFactory()
    UserQuota.objects.create(user=user, plan=plan)
    earlier = NOW - dt.timedelta(days=3)
    ledger(user, "7.000000", when=earlier)
    usage_rollup(day=earlier.date())
    ledger(user, "1.500000")

    alerts = budget_alerts_check(now=NOW)

    assert [(a.period, a.threshold, a.spent_usd) for a in alerts] == [
        ("month", 80, Decimal("8.500000"))
    ]
    assert alerts[0].period_start == dt.date(2026, 11, 1)


def test_budget_alert_new_period_alerts_again():
    user = UserFactory()
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "1.000000")
    ledger(user, "1.000000", when=NOW + dt.timedelta(days=1))

    first = budget_alerts_check(now=NOW)
    again = budget_alerts_check(now=NOW)
    next_day = budget_alerts_check(now=NOW + dt.timedelta(days=1))

    assert sorted(a.threshold for a in first) == [80, 100]
    assert again == []
    assert sorted(a.threshold for a in next_day) == [80, 100]
    assert {a.period_start for a in next_day} == {NOW.date() + dt.timedelta(days=1)}


def test_budget_alert_passed_in_the_last_minute_of_a_day_and_month_is_still_sent():
    last_minute = dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC)
    plan = PlanFactory(cost_per_day=Decimal("1.00"), cost_per_month=Decimal("10.00"))
    user = UserFactory()
    UserQuota.objects.create(user=user, plan=plan)
    ledger(user, "7.500000", when=dt.datetime(2026, 11, 20, 12, tzinfo=dt.UTC))
    usage_rollup(day=dt.date(2026, 11, 20))
    assert budget_alerts_check(now=last_minute) == []
    # Spent after that check and before the next, which runs in the new day and month.
    ledger(user, "0.900000", when=last_minute + dt.timedelta(seconds=30))

    alerts = budget_alerts_check(now=last_minute + dt.timedelta(seconds=80))

    assert sorted((a.period, a.period_start, a.threshold, a.spent_usd) for a in alerts) == [
        ("day", dt.date(2026, 11, 30), 80, Decimal("0.900000")),
        ("month", dt.date(2026, 11, 1), 80, Decimal("8.400000")),
    ]
    assert budget_alerts_check(now=last_minute + dt.timedelta(seconds=140)) == []


def test_budget_alert_unlimited_or_zero_budget_never_alerts():
    unlimited, zero = UserFactory(), UserFactory()
    UserQuota.objects.create(user=unlimited)
    UserQuota.objects.create(user=zero, cost_per_day=Decimal("0"))
    ledger(unlimited, "50.000000")
    ledger(zero, "0.000000")

    assert budget_alerts_check(now=NOW) == []
    assert not BudgetAlert.objects.exists()


def test_budget_alert_failed_webhook_is_recorded_then_delivered_once(webhook):
    user = UserFactory(email="")
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "0.800000")
    webhook.status = 500

    budget_alerts_check(now=NOW)
    alert = BudgetAlert.objects.get(user=user)
    assert not alert.webhook_sent
    assert "webhook" in alert.delivery_error
    assert alert.delivery_attempts == 1

    webhook.status = 200
    assert budget_alerts_check(now=NOW) == []
    alert.refresh_from_db()
    assert alert.webhook_sent
    assert alert.delivery_error == ""
    assert alert.delivery_attempts == 2
    budget_alerts_check(now=NOW)
    assert len(webhook.bodies) == 2  # the failed attempt, then the delivery; nothing after
    assert len(mail.outbox) == 0


def test_budget_alert_left_undelivered_by_a_dead_check_is_delivered_by_a_later_one(
    webhook, settings
):
    settings.BUDGET_ALERT_EMAILS = ["ops@example.com"]
    user = UserFactory(email="")
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "0.800000")
    # A check created this alert, then died (killed, time limit) before delivering it.
    left = _day_alert_at_80(user, "0.800000")
    BudgetAlert.objects.filter(pk=left.pk).update(
        created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    )
    # One another check has just created and is still delivering: not sent twice.
    other = UserFactory(email="")
    in_flight = _day_alert_at_80(other, "0.900000")

    assert budget_alerts_check(now=NOW) == []

    left.refresh_from_db()
    assert (left.webhook_sent, left.email_sent, left.delivery_attempts) == (True, True, 1)
    assert [b["user"] for b in webhook.bodies] == [user.username]
    assert len(mail.outbox) == 1
    in_flight.refresh_from_db()
    assert in_flight.delivery_attempts == 0
    budget_alerts_check(now=NOW)
    assert len(webhook.bodies) == 1


def test_budget_alert_malformed_webhook_url_is_recorded_and_the_email_sent_once(settings):
    settings.BUDGET_ALERT_WEBHOOK_URL = "http://[::1/hooks/budget"
    alice = UserFactory(email="alice@example.com")
    bob = UserFactory(email="bob@example.com")
    for user in (alice, bob):
        UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
        ledger(user, "0.800000")

    created = budget_alerts_check(now=NOW)

    assert len(created) == 2
    for alert in BudgetAlert.objects.all():
        assert alert.email_sent
        assert not alert.webhook_sent
        assert alert.delivery_attempts == 1
        assert alert.delivery_error.startswith("webhook: ")
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@example.com", "bob@example.com"]
    for _ in range(4):
        budget_alerts_check(now=NOW)
    assert len(mail.outbox) == 2
    assert set(BudgetAlert.objects.values_list("delivery_attempts", flat=True)) == {3}


def test_budget_alert_webhook_that_times_out_is_recorded_not_raised(settings):
    import socket

    # Accepts the connection and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    settings.BUDGET_ALERT_WEBHOOK_URL = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
    settings.BUDGET_ALERT_WEBHOOK_TIMEOUT = 0.2
    user = UserFactory(email="")
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "1.000000")
    try:
        created = budget_alerts_check(now=NOW)
    finally:
        silent.close()

    assert sorted(a.threshold for a in created) == [80, 100]
    for alert in BudgetAlert.objects.all():
        assert not alert.webhook_sent
        assert "webhook" in alert.delivery_error
        assert alert.delivery_attempts == 1


def test_budget_alert_retried_by_two_overlapping_checks_is_delivered_once(
    transactional_db, settings
):
    # A check that outlives the beat period (a webhook slow to answer) overlaps the next
    # one: both find the same alert waiting for a retry, and only one may deliver it.
    arrived, release = threading.Event(), threading.Event()
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            bodies.append(json.loads(self.rfile.read(length)))
            if len(bodies) == 1:  # the first delivery waits until the other check is done
                arrived.set()
                release.wait(10)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.BUDGET_ALERT_WEBHOOK_URL = f"http://127.0.0.1:{server.server_port}/hook"
    settings.BUDGET_ALERT_EMAILS = ["ops@example.com"]
    user = UserFactory(email="")
    UserQuota.objects.create(user=user, cost_per_day=Decimal("1.00"))
    ledger(user, "0.800000")
    # Its first delivery failed whole (SMTP and webhook down): the next checks retry it.
    alert = _day_alert_at_80(
        user, "0.800000", delivery_attempts=1, delivery_error="email: refused; webhook: refused"
    )

    def slow_check():
        try:
            budget_alerts_check(now=NOW)
        finally:
            connection.close()

    first = threading.Thread(target=slow_check)
    first.start()
    try:
        assert arrived.wait(10)
        budget_alerts_check(now=NOW)
    finally:
        release.set()
        first.join()
        server.shutdown()
        server.server_close()

    assert len(mail.outbox) == 1
    assert len(bodies) == 1
    alert.refresh_from_db()
    assert (alert.email_sent, alert.webhook_sent, alert.delivery_error) == (True, True, "")
    assert alert.delivery_attempts == 2
