"""Edges of the enforcement engine against the real Redis and PostgreSQL: limits of 0,
limits changed mid-window, estimates against budgets, overruns, leases, calendar
boundaries and the waits a refusal names."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from quotas import services
from quotas.errors import KeyExpired, QuotaExceeded
from quotas.models import GlobalLimits, ProviderQuota, UsageRecord

pytestmark = pytest.mark.django_db

NOW = 1_795_000_002.0  # 2026-11-18 (2 s into a 5 s sub-bucket of the minute)
DAY_END = datetime(2026, 11, 19, tzinfo=UTC).timestamp()
MONTH_END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()


def admit(
    user, *, now=NOW, prompt=10, max_tokens=10, model="local/demo", key_id=None, priority="high"
):
    return services.admission_admit(
        user_id=user.pk,
        key_id=key_id,
        model=model,
        request_id=uuid.uuid4().hex,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        priority=priority,
        now=now,
    )


def refusal(user, **kwargs) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        admit(user, **kwargs)
    return info.value


def settle(admission, prompt, completion):
    return services.usage_settle(
        admission=admission, prompt_tokens=prompt, completion_tokens=completion, latency_ms=1
    )


def limits(user, now=NOW):
    return services.quota_standing(user_id=user.pk, now=now)["limits"]


# --- limits of 0, and no limit ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("requests_per_minute", 0, 0, 60),
        ("requests_per_hour", 0, 0, 3600),
        ("requests_per_day", 0, 0, DAY_END - NOW),
        ("tokens_per_minute", 0, 0, 60),
        ("tokens_per_day", 0, 0, DAY_END - NOW),
        ("cost_per_day", Decimal(0), "0.00", DAY_END - NOW),
        ("cost_per_month", Decimal(0), "0.00", MONTH_END - NOW),
        ("concurrency", 0, 0, 1),
    ],
)
def test_a_limit_of_zero_refuses_the_first_request_naming_it(engine, user, plan_for, case):
    dimension, value, shown, wait = case
    plan_for(user, **{dimension: value})
    err = refusal(user)
    assert (err.scope, err.dimension, err.limit) == ("plan", dimension, shown)
    assert err.retry_after == int(wait)
    assert err.extra_headers()["Retry-After"] == str(int(wait))
    assert err.as_dict()["error"]["retry_after"] == int(wait)
    entry = limits(user)[dimension]
    assert entry["used"] in (0, "0.00")
    assert entry["remaining"] in (0, "0.00")


@pytest.mark.parametrize(
    "case",
    [
        ("requests_per_minute", "X-RateLimit-Reset-Requests", "1m0s"),
        ("requests_per_hour", "X-RateLimit-Reset-Requests", "1h0m0s"),
        ("tokens_per_minute", "X-RateLimit-Reset-Tokens", "1m0s"),
    ],
)
def test_a_limit_of_zero_never_says_it_resets_at_once(engine, user, plan_for, case):
    # Nothing is in the window to leave it: "0s" would have clients ask again at once, and
    # be refused again, where Retry-After says the window's length.
    dimension, header, reset = case
    plan_for(user, **{dimension: 0})
    err = refusal(user)
    assert err.headers[header] == reset
    assert err.extra_headers()["Retry-After"] == str(err.retry_after)
    if header.endswith("Requests"):
        assert err.headers["RateLimit"].endswith(f";t={err.retry_after}")
    headers = services.quota_headers(user_id=user.pk, key_id=None, now=NOW)
    assert headers[header] == reset


def test_a_cost_limit_of_zero_refuses_a_free_model_too(engine, user, plan_for, free_model):
    plan_for(user, cost_per_day=Decimal(0))
    err = refusal(user, model=free_model)
    assert (err.dimension, err.limit) == ("cost_per_day", "0.00")


def test_an_unset_limit_is_unlimited(engine, user, plan_for):
    plan_for(user, requests_per_minute=None, tokens_per_day=None, cost_per_day=None)
    for _ in range(50):
        admit(user, prompt=10_000, max_tokens=10_000)
    standing = limits(user)
    assert standing["requests_per_minute"] == {
        "limit": None,
        "used": 0,
        "remaining": None,
        "reset_in": 0,
    }
    assert standing["cost_per_day"]["limit"] is None


# --- calendar boundaries ---------------------------------------------------------------------


def test_day_window_ends_at_utc_midnight(engine, user, plan_for):
    plan_for(user, requests_per_day=2)
    admit(user, now=DAY_END - 10)
    admit(user, now=DAY_END - 5)
    err = refusal(user, now=DAY_END - 0.5)
    assert (err.dimension, err.retry_after) == ("requests_per_day", 1)
    admit(user, now=DAY_END)  # a new UTC day
    admit(user, now=DAY_END + 1)
    assert refusal(user, now=DAY_END + 2).retry_after == 86400 - 2


def test_month_window_ends_at_the_first_of_the_next_month_utc(engine, user, plan_for):
    # 10 + 10 tokens at 1.50 and 2.00 a million: 0.000035 each.
    plan_for(user, cost_per_month=Decimal("0.000070"))
    settle(admit(user, now=MONTH_END - 86400 * 20), 10, 10)
    settle(admit(user, now=MONTH_END - 1), 10, 10)
    err = refusal(user, now=MONTH_END - 0.25)
    assert (err.dimension, err.retry_after) == ("cost_per_month", 1)
    admit(user, now=MONTH_END)  # December
    assert limits(user, now=MONTH_END)["cost_per_month"]["used"] == "0.000035"


def test_request_settled_after_midnight_counts_in_the_day_it_was_admitted(
    redis_conn, user, plan_for
):
    # Admitted at 23:59:59 and settled after midnight: it is in the day it reserved in, in
    # Redis and in the ledger alike, so the next day rebuilt from the ledger starts empty.
    plan_for(user, tokens_per_day=100)
    late = admit(user, now=DAY_END - 1, prompt=40, max_tokens=40)
    settle(late, 40, 40)
    row = UsageRecord.objects.get(request_id=late.request_id)
    assert row.created_at == datetime.fromtimestamp(DAY_END - 1, tz=UTC)
    redis_conn.flushdb()  # the next day is rebuilt from the ledger
    admit(user, now=DAY_END + 1, prompt=40, max_tokens=40)
    assert limits(user, now=DAY_END + 1)["tokens_per_day"]["used"] == 80
    assert limits(user, now=DAY_END - 1)["tokens_per_day"]["used"] == 80


# --- limits changed mid-window ---------------------------------------------------------------


def test_limit_lowered_below_use_refuses_and_shows_nothing_negative(engine, user, plan_for, save):
    plan = plan_for(user, requests_per_minute=10, tokens_per_day=1000, cost_per_day=Decimal("1.00"))
    for _ in range(4):
        settle(admit(user, prompt=100, max_tokens=100), 100, 100)
    plan.requests_per_minute = 2
    plan.tokens_per_day = 500
    plan.cost_per_day = Decimal("0.000100")
    save(plan)
    err = refusal(user, now=NOW + 1)
    assert 1 <= err.retry_after <= DAY_END - NOW
    assert err.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert err.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert "r=0;" in err.headers["RateLimit"]
    standing = limits(user, now=NOW + 1)
    assert standing["requests_per_minute"]["remaining"] == 0
    assert standing["requests_per_minute"]["used"] == 4
    assert standing["tokens_per_day"]["remaining"] == 0
    assert standing["cost_per_day"]["remaining"] == "0.00"
    headers = services.quota_headers(user_id=user.pk, key_id=None, now=NOW + 1)
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    assert headers["X-RateLimit-Remaining-Tokens"] == "0"


def test_limit_raised_mid_day_admits_at_once(engine, user, plan_for, save):
    plan = plan_for(user, tokens_per_day=200)
    admit(user, prompt=100, max_tokens=100)
    refusal(user, prompt=1, max_tokens=1)
    plan.tokens_per_day = 202
    save(plan)
    admit(user, prompt=1, max_tokens=1)


# --- estimates, and usage beyond them --------------------------------------------------------


def test_reservation_beyond_the_token_budget_is_refused_on_the_estimate(engine, user, plan_for):
    # The contract reserves prompt + max_tokens: a request that might not fit is refused
    # whole (consuming nothing), even if its answer would have been short.
    plan_for(user, tokens_per_day=100)
    settle(admit(user, prompt=30, max_tokens=30), 30, 30)  # 40 left
    err = refusal(user, prompt=20, max_tokens=30)
    assert err.dimension == "tokens_per_day"
    assert limits(user)["tokens_per_day"]["used"] == 60
    admit(user, prompt=20, max_tokens=20)  # a smaller max_tokens fits


def test_usage_beyond_the_reservation_is_counted_in_full(engine, user, plan_for):
    plan_for(user, tokens_per_minute=10_000, tokens_per_day=10_000, cost_per_day=Decimal("0.01"))
    a = admit(user, prompt=10, max_tokens=10)
    # The provider counted far more than estimated: 2000 + 3000 tokens, 0.009 USD.
    assert settle(a, 2000, 3000) == Decimal("0.009")
    standing = limits(user)
    assert standing["tokens_per_minute"]["used"] == 5000
    assert standing["tokens_per_day"]["used"] == 5000
    assert standing["cost_per_day"]["used"] == "0.009"
    b = admit(user, prompt=100, max_tokens=100)  # 0.00035 more fits: 0.00935
    settle(b, 1000, 1000)  # but it used 0.0035: the budget is overrun, and says so
    standing = limits(user)
    assert (standing["cost_per_day"]["used"], standing["cost_per_day"]["remaining"]) == (
        "0.0125",
        "0.00",
    )
    err = refusal(user, prompt=1, max_tokens=1)
    assert err.dimension == "cost_per_day"
    assert err.retry_after == int(DAY_END - NOW)


# --- concurrency leases ----------------------------------------------------------------------


def test_a_crashed_requests_lease_is_held_until_its_ttl_and_not_a_moment_longer(
    engine, user, plan_for, settings
):
    settings.QUOTA_LEASE_TTL = 30
    plan_for(user, concurrency=1, tokens_per_day=100)
    admit(user, prompt=40, max_tokens=40)  # its worker dies: never settled
    assert services.reservations_sweep(now=NOW + 29) == 0
    err = refusal(user, now=NOW + 29.5, prompt=1, max_tokens=1)
    assert (err.dimension, err.retry_after) == ("concurrency", 1)
    assert limits(user, now=NOW + 29.5)["concurrency"]["used"] == 1
    assert limits(user, now=NOW + 30)["concurrency"]["used"] == 0
    admit(user, now=NOW + 30, prompt=40, max_tokens=40)  # its tokens were given back too


def test_a_settled_requests_lease_is_free_at_once(engine, user, plan_for):
    plan_for(user, concurrency=1)
    a = admit(user)
    refusal(user)
    settle(a, 10, 10)
    assert limits(user)["concurrency"]["used"] == 0
    admit(user)


# --- waits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("requests_per_minute", 1, 60),
        ("requests_per_hour", 1, 3600),
        ("requests_per_day", 1, DAY_END - NOW),
        ("tokens_per_minute", 20, 60),
        ("tokens_per_day", 20, DAY_END - NOW),
        ("cost_per_day", Decimal("0.000035"), DAY_END - NOW),
        ("cost_per_month", Decimal("0.000035"), MONTH_END - NOW),
    ],
)
def test_refusal_waits_and_resets_stay_within_the_window(engine, user, plan_for, case):
    dimension, value, window = case
    plan_for(user, **{dimension: value})
    settle(admit(user), 10, 10)
    err = refusal(user, now=NOW + 1)
    assert err.dimension == dimension
    # A sliding window frees its oldest sub-bucket at most window + window / 12 from now.
    longest = window + window / 12 if window in (60, 3600) else window
    assert 1 <= err.retry_after <= longest
    reset_in = limits(user, now=NOW + 1)[dimension]["reset_in"]
    assert 1 <= reset_in <= longest
    if window in (60, 3600):  # the request leaves the window when its sub-bucket does
        assert err.retry_after == reset_in
        assert services.admission_admit(
            user_id=user.pk,
            key_id=None,
            model="local/demo",
            request_id=uuid.uuid4().hex,
            prompt_tokens=10,
            max_tokens=10,
            now=NOW + 1 + err.retry_after,
        )


def test_a_refusal_headers_name_the_window_that_refused_when_several_are_full(
    engine, user, plan_for
):
    # 10 a minute and 10 an hour, all 10 used: the minute frees up in a minute, but no
    # request passes for an hour. Headers saying "rpm", reset in 1m, sent clients back
    # to be refused again for the rest of the hour.
    plan_for(user, requests_per_minute=10, requests_per_hour=10)
    for _ in range(10):
        admit(user)
    err = refusal(user, now=NOW + 1)
    assert err.dimension == "requests_per_hour"
    assert err.headers["RateLimit-Policy"] == '"rph";q=10;w=3600'
    assert err.headers["RateLimit"] == f'"rph";r=0;t={err.retry_after}'
    minutes, seconds = divmod(err.retry_after, 60)
    assert err.headers["X-RateLimit-Reset-Requests"] == f"1h{minutes - 60}m{seconds}s"


def test_a_limit_lowered_below_use_resets_when_a_request_fits_again(engine, user, plan_for, save):
    # 4 requests in 4 sub-buckets, then the limit lowered to 2: the first bucket leaving
    # the window is not enough, 3 must leave before one more request fits.
    plan = plan_for(user, requests_per_minute=10)
    for i in range(4):
        admit(user, now=NOW + 5 * i)
    plan.requests_per_minute = 2
    save(plan)
    err = refusal(user, now=NOW + 16)
    assert err.headers["RateLimit"] == f'"rpm";r=0;t={err.retry_after}'
    admit(user, now=NOW + 16 + err.retry_after)


# --- keys that expire ------------------------------------------------------------------------


def test_a_key_that_expires_is_refused_by_admission_with_its_policy_cached(
    user, plan_for, redis_conn
):
    # A batch job admits its items with its key long after the request that created it was
    # authenticated: admission itself must notice the expiry, which bumps no policy version.
    plan_for(user)
    _, key = services.key_create(user=user, expires_at=timezone.now() + timedelta(seconds=1))
    admit(user, key_id=key.pk, now=time.time())
    time.sleep(max(0.0, key.expires_at.timestamp() - time.time()) + 0.05)
    with pytest.raises(KeyExpired):
        admit(user, key_id=key.pk, now=time.time())


def test_a_day_budget_cleared_and_set_again_counts_what_was_spent_meanwhile(
    engine, user, plan_for, save
):
    plan = plan_for(user, tokens_per_day=100)
    settle(admit(user), 10, 10)
    plan.tokens_per_day = None  # unlimited for a while: nothing refuses, the ledger counts
    save(plan)
    for _ in range(5):
        settle(admit(user, now=NOW + 1), 10, 10)
    plan.tokens_per_day = 100
    save(plan)
    # 120 tokens spent today: the budget of 100 is gone, whatever Redis counted before.
    assert limits(user, now=NOW + 2)["tokens_per_day"]["used"] == 120
    assert refusal(user, now=NOW + 2).dimension == "tokens_per_day"


# --- priority shares and safety margins ------------------------------------------------------


def admitted(user, n, **kwargs) -> int:
    count = 0
    for _ in range(n):
        try:
            admit(user, **kwargs)
            count += 1
        except QuotaExceeded:
            pass
    return count


def test_a_priority_share_of_a_global_limit_is_taken_exactly(engine, user, plan_for):
    # Medium may use 70% of 90 requests an hour: 63, not the 62 that 90 x 0.7 floors to in
    # binary floating point (62.99999999999999).
    plan_for(user)
    GlobalLimits.objects.update_or_create(pk=1, defaults={"requests_per_hour": 90})
    assert admitted(user, 70, priority="medium") == 63
    err = refusal(user, priority="medium")
    assert (err.scope, err.dimension, err.limit) == ("global", "requests_per_hour", 63)


def test_a_safety_margin_of_a_provider_limit_is_taken_exactly(engine, user, plan_for):
    plan_for(user)
    ProviderQuota.objects.create(
        provider="local", model="", requests_per_minute=100, safety_margin="0.57"
    )
    assert admitted(user, 70, priority="critical") == 57


def test_a_priority_share_of_a_limit_of_one_is_not_rounded_to_nothing(engine, user, plan_for):
    # A global concurrency of 1 (one request at a time upstream): 90% of it floors to 0,
    # which refused every request of the default priority forever, on an idle scope, with
    # "limit 0" and a Retry-After of 1 that waiting never honoured.
    plan_for(user)
    GlobalLimits.objects.update_or_create(pk=1, defaults={"concurrency": 1})
    first = admit(user)
    err = refusal(user, priority="critical")  # the one slot is taken, whoever asks
    assert (err.scope, err.dimension, err.limit) == ("global", "concurrency", 1)
    settle(first, 10, 10)
    settle(admit(user, priority="low"), 10, 10)
    # A share of 0 is the operator's own: that priority is refused everything.
    GlobalLimits.objects.filter(pk=1).update(low_share=Decimal(0))
    services.local_state_reset()
    assert refusal(user, priority="low").limit == 0
    settle(admit(user, priority="medium"), 10, 10)


def test_a_provider_limit_of_two_with_the_default_margin_still_serves(engine, user, plan_for):
    # A free tier's 2 requests a minute, at a margin of 0.8: 1 usable, of which high's 90%
    # floored to nothing.
    plan_for(user)
    ProviderQuota.objects.create(
        provider="local", model="", requests_per_minute=2, safety_margin="0.80"
    )
    assert admitted(user, 3) == 1
    assert refusal(user, priority="critical").limit == 1


def test_critical_still_passes_once_low_is_refused_at_a_small_limit(engine, user, plan_for):
    plan_for(user)
    GlobalLimits.objects.update_or_create(pk=1, defaults={"requests_per_hour": 3})
    assert admitted(user, 3, priority="low") == 1
    assert admitted(user, 3, priority="high") == 1
    assert admitted(user, 3, priority="critical") == 1
    assert refusal(user, priority="critical").limit == 3


# --- refusal counts --------------------------------------------------------------------------


def test_refusals_are_counted_by_the_utc_day_they_happen_on(engine, user, plan_for):
    # The embedded default counted every refusal since its start as today's: yesterday's
    # showed in "denials today" (GET /api/v1/quota/global) and were persisted again as
    # today's (denials_persist).
    plan_for(user, requests_per_day=0)
    refusal(user, now=DAY_END - 10)
    refusal(user, now=DAY_END + 10)
    refusal(user, now=DAY_END + 20)
    backend = services.backend()
    assert backend.denials(day="20261118") == {"plan|requests_per_day": 1}
    assert backend.denials(day="20261119") == {"plan|requests_per_day": 2}
    assert backend.denials(day="20261120") == {}
