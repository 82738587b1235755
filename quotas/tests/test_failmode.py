"""Redis stopped: QUOTA_FAIL_MODE=open keeps serving within the limits, closed refuses.

A private redis-server is started for these tests and really stopped, so that the shared
one other tests use is left alone.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import pytest
from django.db.models import Sum

from config.tests.redis_server import PrivateRedis, point_settings_at
from quotas import services
from quotas.errors import QuotaExceeded, QuotaUnavailable
from quotas.models import Outcome, UsageRecord

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture
def private_redis(settings):
    server = PrivateRedis()
    server.start()
    point_settings_at(settings, server)
    services.local_state_reset()
    yield server
    server.stop()
    services.local_state_reset()


def admit(user, **kwargs):
    return services.admission_admit(
        user_id=user.pk,
        key_id=None,
        model=kwargs.pop("model", "local/demo"),
        request_id=uuid.uuid4().hex,
        prompt_tokens=kwargs.pop("prompt", 1),
        max_tokens=kwargs.pop("max_tokens", 1),
        **kwargs,
    )


def count_admitted(user, n, **kwargs):
    admitted = 0
    for _ in range(n):
        try:
            a = admit(user, **kwargs)
        except QuotaExceeded:
            continue
        services.usage_settle(
            admission=a, prompt_tokens=a.prompt_tokens, completion_tokens=a.max_tokens
        )
        admitted += 1
    return admitted


def test_fail_open_request_window_uses_per_worker_share(private_redis, settings, user, plan_for):
    settings.QUOTA_FAIL_MODE = "open"
    settings.QUOTA_WORKER_COUNT = 2
    plan_for(user, requests_per_minute=10)
    assert count_admitted(user, 1) == 1
    private_redis.stop()
    # The in-process limiter allows 10 / 2 workers in this process.
    assert count_admitted(user, 8) == 5
    assert UsageRecord.objects.filter(user=user, outcome=Outcome.OK).count() == 6


def test_fail_open_never_fails_open_on_money(private_redis, settings, user, plan_for):
    settings.QUOTA_FAIL_MODE = "open"
    plan_for(user, cost_per_day=Decimal("0.000600"))
    # 100 x 1.50 + 100 x 2.00 per million = 0.00035 reserved, settled at the same.
    assert count_admitted(user, 1, prompt=100, max_tokens=100) == 1
    private_redis.stop()
    assert count_admitted(user, 5, prompt=100, max_tokens=100) == 0
    assert count_admitted(user, 5, prompt=10, max_tokens=10) == 5  # 0.000035 each fits
    spent = UsageRecord.objects.filter(user=user).aggregate(t=Sum("cost_usd"))["t"]
    assert spent == Decimal("0.000525")


def test_fail_open_spending_counts_after_redis_comes_back(private_redis, settings, user, plan_for):
    settings.QUOTA_FAIL_MODE = "open"
    plan_for(user, cost_per_day=Decimal("0.000700"))
    assert count_admitted(user, 1, prompt=100, max_tokens=100) == 1
    private_redis.stop()
    assert count_admitted(user, 1, prompt=100, max_tokens=100) == 1
    private_redis.start()  # back, but empty: and even if it had kept its data, it missed one
    time.sleep(1.1)  # fail-open retries Redis at most once a second
    with pytest.raises(QuotaExceeded) as info:
        admit(user, prompt=100, max_tokens=100)
    assert info.value.dimension == "cost_per_day"


def test_a_renewal_redis_cannot_take_is_logged_once_and_tried_again(
    private_redis, settings, user, plan_for, caplog
):
    """A long stream's renewals while Redis is away fail, quietly after the first; once
    Redis is back the next one holds its lease again."""
    settings.QUOTA_LEASE_TTL = 2
    plan_for(user, concurrency=1)
    running = admit(user)
    renewal = services.renewal_start(admission=running)
    try:
        private_redis.stop_keeping_data()
        time.sleep(2.5)  # some three renewals fail meanwhile, past the lease's life
        private_redis.start()  # back whole
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # Redis retried at most once a second
            if services.quota_standing(user_id=user.pk)["limits"]["concurrency"]["used"]:
                break
            time.sleep(0.1)
        assert services.reservations_sweep() == 0
        with pytest.raises(QuotaExceeded) as info:
            admit(user)
        assert info.value.dimension == "concurrency"
    finally:
        renewal.stop()
    complaints = [r for r in caplog.records if "not renewed" in r.getMessage()]
    assert len(complaints) == 1


def test_fail_closed_answers_quota_unavailable(private_redis, settings, user, plan_for):
    settings.QUOTA_FAIL_MODE = "closed"
    plan_for(user, requests_per_minute=10)
    private_redis.stop()
    with pytest.raises(QuotaUnavailable) as info:
        admit(user)
    assert info.value.status_code == 503
    assert info.value.code == "quota_unavailable"
    assert not UsageRecord.objects.filter(user=user).exists()


def test_fail_open_hit_refused_by_the_ledger_gives_its_request_count_back(
    private_redis, settings, user, plan_for
):
    from quotas.services import key_create

    settings.QUOTA_FAIL_MODE = "open"
    settings.QUOTA_WORKER_COUNT = 1
    plan_for(user, requests_per_minute=3)  # the user's minute window, in this worker
    _, key = key_create(user=user, name="one a day")
    key.requests_per_day = 1  # the key's day window, in the ledger while Redis is away
    key.save()
    private_redis.stop()
    services.admission_count_hit(
        user_id=user.pk, key_id=key.pk, model="local/demo", request_id=uuid.uuid4().hex
    )
    for _ in range(4):  # the key's day is spent: each is refused by the ledger
        with pytest.raises(QuotaExceeded) as info:
            services.admission_count_hit(
                user_id=user.pk, key_id=key.pk, model="local/demo", request_id=uuid.uuid4().hex
            )
        assert info.value.dimension == "requests_per_day"

    # Only the hit that was served holds a place in the user's minute window.
    assert count_admitted(user, 3) == 2


def test_fail_open_cost_limit_of_zero_refuses_a_free_model_too(
    private_redis, settings, user, plan_for, free_model
):
    settings.QUOTA_FAIL_MODE = "open"
    plan_for(user, cost_per_day=Decimal(0))
    private_redis.stop()
    with pytest.raises(QuotaExceeded) as info:
        admit(user, model=free_model)
    assert info.value.dimension == "cost_per_day"
    assert not UsageRecord.objects.filter(user=user).exists()


@pytest.mark.django_db(transaction=True)  # the lock is taken from a connection of its own
def test_fail_open_settlement_the_ledger_cannot_take_is_kept_and_replaces_the_pending_row(
    private_redis, settings, user, plan_for
):
    """Admitted in fail-open, a request has a pending row holding its estimate. If its
    settlement cannot be written (a migration's lock on the ledger, a blip), the answer is
    still given and the settled row waits in the spool; written later, it replaces the
    pending one, which the sweep then leaves alone."""
    import threading

    import psycopg
    from django.db import connection

    from quotas.services import usage_flush
    from quotas.services.counters import pending_rows_abandon

    settings.QUOTA_FAIL_MODE = "open"
    plan_for(user, cost_per_day=Decimal("1"))
    private_redis.stop()
    admission = admit(user, prompt=100, max_tokens=100)
    assert admission.backend == "degraded"
    db = settings.DATABASES["default"]
    dsn = f"host={db['HOST']} port={db['PORT'] or 5432} user={db['USER']} dbname={db['NAME']}"
    options = connection.settings_dict["OPTIONS"]
    saved = options.get("options")
    options["options"] = "-c lock_timeout=200"
    connection.close()
    try:
        with psycopg.connect(dsn) as other:  # in a transaction until the block ends
            other.execute("LOCK TABLE quotas_usagerecord IN ACCESS EXCLUSIVE MODE")
            released = threading.Timer(10, other.rollback)  # a bound, should the test fail
            released.start()
            services.usage_settle(admission=admission, prompt_tokens=100, completion_tokens=40)
            settled_while_locked = released.is_alive()
            released.cancel()
    finally:
        options["options"] = saved
        connection.close()

    assert settled_while_locked
    row = UsageRecord.objects.get(request_id=admission.request_id)
    assert (row.outcome, row.completion_tokens) == (Outcome.PENDING, 100)  # the estimate
    assert usage_flush() == 1
    row.refresh_from_db()
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == (Outcome.OK, 100, 40)
    assert row.cost_usd == Decimal("0.00023")  # 100 x 1.50 + 40 x 2.00 per million
    assert pending_rows_abandon(now=time.time() + 2 * settings.QUOTA_LEASE_TTL + 1) == 0


def test_a_replayed_row_leaves_a_settled_row_of_the_same_request_as_it_is(user):
    from quotas.services import ledger

    def row(outcome, tokens):
        return ledger._row(
            request_id="once",
            user_id=user.pk,
            api_key_id=None,
            model="local/demo",
            provider="local",
            prompt_tokens=tokens,
            outcome=outcome,
        )

    ledger._insert_or_keep(row(Outcome.OK, 10))
    assert ledger._write_rows([row(Outcome.OK, 99), row(Outcome.OK, 99)]) == 1
    ledger._insert_or_keep(row(Outcome.PENDING, 77))

    assert UsageRecord.objects.get(request_id="once").prompt_tokens == 10
