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
