"""The enforcement engine against the real Redis: windows, reservations, settlement."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import pytest

from quotas import services
from quotas.errors import QuotaExceeded
from quotas.models import ApiKey, GlobalLimits, Outcome, ProviderQuota, UsageRecord
from quotas.policy import usd_to_micros

pytestmark = pytest.mark.django_db

NOW = 1_795_000_000.0  # a fixed moment (2026-11-18), far from a minute boundary


def admit(user, *, key_id=None, now=NOW, prompt=10, max_tokens=10, priority="high"):
    return services.admission_admit(
        user_id=user.pk,
        key_id=key_id,
        model="local/demo",
        request_id=uuid.uuid4().hex,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        priority=priority,
        now=now,
    )


def admitted(user, n, **kwargs):
    count = 0
    for _ in range(n):
        try:
            admit(user, **kwargs)
            count += 1
        except QuotaExceeded:
            pass
    return count


def test_admit_rejects_when_any_window_full_and_consumes_nothing(redis_conn, user, plan_for):
    plan_for(user, requests_per_minute=3, tokens_per_minute=1000)
    assert admitted(user, 3) == 3
    before = {k: redis_conn.dump(k) for k in redis_conn.keys("tg:q:{u:*")}
    with pytest.raises(QuotaExceeded) as info:
        admit(user)
    after = {k: redis_conn.dump(k) for k in redis_conn.keys("tg:q:{u:*")}
    assert before == after
    err = info.value
    assert (err.scope, err.dimension, err.limit) == ("plan", "requests_per_minute", 3)
    assert err.retry_after >= 1
    assert err.headers["X-RateLimit-Remaining-Requests"] == "0"


def test_admit_raising_limit_admits_exactly_the_difference(engine, user, plan_for, save):
    plan = plan_for(user, requests_per_minute=5)
    assert admitted(user, 8) == 5
    plan.requests_per_minute = 8
    save(plan)
    assert admitted(user, 10, now=NOW + 1) == 3


def test_admit_lowering_limit_refuses_at_once(engine, user, plan_for, save):
    plan = plan_for(user, requests_per_minute=10)
    assert admitted(user, 4) == 4
    plan.requests_per_minute = 4
    save(plan)
    with pytest.raises(QuotaExceeded):
        admit(user)


def test_sliding_minute_window_has_no_double_burst_at_boundary(engine, user, plan_for):
    plan_for(user, requests_per_minute=10)
    boundary = (NOW // 60 + 1) * 60
    assert admitted(user, 10, now=boundary - 1) == 10
    # A fixed window would reset here and admit 10 more within two seconds.
    assert admitted(user, 10, now=boundary + 1) == 0
    # Once the whole minute has passed (plus at most one 5 s sub-bucket), all is free again.
    assert admitted(user, 10, now=boundary - 1 + 65) == 10


def test_user_override_wins_over_plan_and_reports_user_scope(engine, user, plan_for, save):
    plan_for(user, requests_per_minute=10)
    user.quota.requests_per_minute = 2
    save(user.quota)
    assert admitted(user, 2) == 2
    with pytest.raises(QuotaExceeded) as info:
        admit(user)
    assert info.value.scope == "user"


def test_key_limit_is_its_own_scope(engine, user, plan_for):
    plan_for(user, requests_per_minute=10)
    _, key = services.key_create(user=user, name="k", requests_per_minute=2)
    assert admitted(user, 5, key_id=key.pk) == 2
    # The user's other traffic still has the plan's room left.
    assert admitted(user, 10) == 8


def test_settlement_replaces_reservation_to_the_micro_dollar(engine, user, plan_for):
    plan_for(user, cost_per_day=Decimal("1.00"), tokens_per_day=100_000)
    a = admit(user, prompt=1000, max_tokens=4000)
    # Reserved: 1000 x 1.50 + 4000 x 2.00 per million = 0.0095 USD.
    standing = services.quota_standing(user_id=user.pk, now=NOW)["limits"]
    assert standing["cost_per_day"]["used"] == "0.0095"
    assert standing["tokens_per_day"]["used"] == 5000
    cost = services.usage_settle(
        admission=a, prompt_tokens=1000, completion_tokens=333, latency_ms=5
    )
    assert cost == Decimal("0.002166")  # 0.0015 + 0.000666
    standing = services.quota_standing(user_id=user.pk, now=NOW)["limits"]
    assert standing["cost_per_day"]["used"] == "0.002166"
    assert standing["tokens_per_day"]["used"] == 1333
    row = UsageRecord.objects.get(request_id=a.request_id)
    assert (row.prompt_tokens, row.completion_tokens, row.cost_usd) == (
        1000,
        333,
        Decimal("0.002166"),
    )
    assert row.outcome == Outcome.OK


def test_settlement_is_idempotent(engine, user, plan_for):
    plan_for(user, cost_per_day=Decimal("1.00"))
    a = admit(user, prompt=100, max_tokens=100)
    services.usage_settle(admission=a, prompt_tokens=100, completion_tokens=50, latency_ms=1)
    services.usage_settle(admission=a, prompt_tokens=100, completion_tokens=50, latency_ms=1)
    assert UsageRecord.objects.filter(request_id=a.request_id).count() == 1
    assert (
        services.quota_standing(user_id=user.pk, now=NOW)["limits"]["cost_per_day"]["used"]
        == "0.00025"
    )


def test_refund_gives_everything_back(engine, user, plan_for):
    plan_for(user, requests_per_minute=1, cost_per_day=Decimal("1.00"), concurrency=1)
    a = admit(user, prompt=100, max_tokens=100)
    services.usage_refund(admission=a, outcome=Outcome.UPSTREAM_TIMEOUT, latency_ms=9)
    limits = services.quota_standing(user_id=user.pk, now=NOW)["limits"]
    assert limits["cost_per_day"]["used"] == "0.00"
    assert limits["concurrency"]["used"] == 0
    assert limits["requests_per_minute"]["used"] == 0
    row = UsageRecord.objects.get(request_id=a.request_id)
    assert (row.outcome, row.cost_usd) == (Outcome.UPSTREAM_TIMEOUT, Decimal(0))
    admit(user)  # the slot is free again


def test_concurrency_lease_released_by_settlement(engine, user, plan_for):
    plan_for(user, concurrency=2)
    first, _ = admit(user), admit(user)
    with pytest.raises(QuotaExceeded) as info:
        admit(user)
    assert info.value.dimension == "concurrency"
    services.usage_settle(admission=first, prompt_tokens=1, completion_tokens=1, latency_ms=1)
    admit(user)


def test_standing_reads_every_kind_of_window_in_one_round_trip(
    engine, user, plan_for, redis_round_trips
):
    plan_for(
        user, requests_per_minute=10, requests_per_hour=50, requests_per_day=100, concurrency=5
    )
    admit(user, now=NOW - 90)  # out of the minute's window, in the hour's
    admit(user, now=NOW - 30)
    admit(user, now=NOW)  # all three still in flight: three leases
    services.quota_standing(user_id=user.pk, now=NOW)  # a new server loads the script once
    redis_round_trips.count = 0

    limits = services.quota_standing(user_id=user.pk, now=NOW)["limits"]

    assert limits["requests_per_minute"]["used"] == 2
    # The minute's sub-buckets are 5 s long: the request of NOW - 30 leaves the window with
    # its sub-bucket, 13 sub-buckets after the one it is in, 35 s from now.
    assert limits["requests_per_minute"]["reset_in"] == 35
    assert limits["requests_per_hour"]["used"] == 3
    assert limits["requests_per_day"]["used"] == 3
    assert limits["concurrency"] == {"limit": 5, "used": 3, "remaining": 2}
    assert redis_round_trips.count == (1 if engine == "redis" else 0)


def test_abandoned_lease_expires_and_is_refunded(engine, user, plan_for, settings):
    settings.QUOTA_LEASE_TTL = 30
    plan_for(user, concurrency=1, tokens_per_day=100)
    admit(user, prompt=40, max_tokens=40)  # its worker "crashes": never settled
    with pytest.raises(QuotaExceeded):
        admit(user, now=NOW + 10)
    assert services.reservations_sweep(now=NOW + 31) == 1
    limits = services.quota_standing(user_id=user.pk, now=NOW + 31)["limits"]
    assert limits["tokens_per_day"]["used"] == 0
    admit(user, now=NOW + 31, prompt=40, max_tokens=40)


def test_a_renewed_reservation_outlives_its_first_lease(engine, user, plan_for, settings):
    from quotas.services.state import backend

    settings.QUOTA_LEASE_TTL = 30
    plan_for(user, concurrency=1, tokens_per_day=100)
    running = admit(user, prompt=40, max_tokens=40)  # a long stream, still running

    assert backend().renew(request_id=running.request_id, now=NOW + 20) is True
    assert services.reservations_sweep(now=NOW + 31) == 0
    with pytest.raises(QuotaExceeded):
        admit(user, now=NOW + 31)  # its lease is still held
    assert services.reservations_sweep(now=NOW + 51) == 1  # not renewed again: refunded
    assert backend().renew(request_id=running.request_id, now=NOW + 52) is False


def test_a_renewed_reservation_whose_worker_died_is_refunded_by_a_late_sweep(
    redis_conn, user, plan_for, settings
):
    """A stream renewed its reservation, then its worker died; nothing sweeps for longer
    than two leases. Its renewal must not have cut the reservation's life short: the late
    sweep still gives its estimate back."""
    from quotas.services.state import backend

    settings.QUOTA_LEASE_TTL = 1
    plan_for(user, tokens_per_day=1000)
    running = admit(user, now=None, prompt=40, max_tokens=40)
    assert backend().renew(request_id=running.request_id, now=time.time()) is True
    time.sleep(3)  # its worker is gone: no renewal, no sweep, no admission meanwhile

    assert services.reservations_sweep() == 1
    assert services.quota_standing(user_id=user.pk)["limits"]["tokens_per_day"]["used"] == 0


def test_a_renewal_holds_a_reservation_on_its_own_until_stopped(
    redis_conn, user, plan_for, settings
):
    """Nothing of the request runs meanwhile (a stream whose client stopped reading): the
    renewal's thread keeps its reservation and lease past the lease's life; once stopped,
    it renews them no more."""
    settings.QUOTA_LEASE_TTL = 2
    plan_for(user, concurrency=1, tokens_per_day=100)
    running = admit(user, now=None, prompt=40, max_tokens=40)
    renewal = services.renewal_start(admission=running)
    try:
        time.sleep(3)  # past the lease's life
        assert services.reservations_sweep() == 0
        with pytest.raises(QuotaExceeded) as info:
            admit(user, now=None)
        assert info.value.dimension == "concurrency"
    finally:
        stopped_at = time.time()
        renewal.stop()
    time.sleep(1.5)  # the time of two renewals, had it not stopped
    # Its last lease, taken before it stopped (or by a renewal under way then), has run out
    # a lease's life and a second later: refunded. A renewal that had gone on after the
    # stop (at +1.33 s) would hold it until +3.33 s.
    assert services.reservations_sweep(now=stopped_at + 3.0) == 1
    assert services.quota_standing(user_id=user.pk)["limits"]["tokens_per_day"]["used"] == 0


def test_a_renewal_ends_by_itself_once_its_request_is_settled(redis_conn, user, plan_for, settings):
    settings.QUOTA_LEASE_TTL = 1
    plan_for(user, concurrency=1)
    running = admit(user, now=None)
    renewal = services.renewal_start(admission=running)
    services.usage_settle(admission=running, prompt_tokens=1, completion_tokens=1)

    deadline = time.monotonic() + 10  # its next renewal finds nothing left to renew
    while renewal.running and time.monotonic() < deadline:
        time.sleep(0.05)

    assert not renewal.running


def test_late_settlement_after_sweep_still_charges_actual_usage(engine, user, plan_for, settings):
    settings.QUOTA_LEASE_TTL = 30
    plan_for(user, tokens_per_day=1000)
    slow = admit(user, prompt=100, max_tokens=100)
    services.reservations_sweep(now=NOW + 31)
    services.usage_settle(admission=slow, prompt_tokens=100, completion_tokens=20, latency_ms=31000)
    limits = services.quota_standing(user_id=user.pk, now=NOW + 32)["limits"]
    assert limits["tokens_per_day"]["used"] == 120


def test_flushall_mid_day_rebuilds_day_budget_from_ledger(redis_conn, user, plan_for):
    plan_for(user, cost_per_day=Decimal("0.000500"))
    for _ in range(4):
        try:
            a = admit(user, prompt=50, max_tokens=50)
        except QuotaExceeded:
            continue
        services.usage_settle(admission=a, prompt_tokens=50, completion_tokens=50, latency_ms=1)
    # Each request costs 50 x 1.50 + 50 x 2.00 per million = 0.000175 USD: the third
    # (0.000525 > 0.0005) is refused, so two went through.
    spent = sum(r.cost_usd for r in UsageRecord.objects.filter(user=user))
    assert spent == Decimal("0.000350")
    redis_conn.flushdb()  # Redis lost Tollgate's data (its database only: not FLUSHALL,
    # which would empty every database of the developer's server)
    with pytest.raises(QuotaExceeded) as info:
        admit(user, prompt=50, max_tokens=50, now=NOW + 1)
    assert info.value.dimension == "cost_per_day"
    # The rebuilt counter holds exactly what the ledger holds.
    assert (
        services.quota_standing(user_id=user.pk, now=NOW)["limits"]["cost_per_day"]["used"]
        == "0.00035"
    )


def test_cache_hit_counts_requests_only(engine, user, plan_for):
    plan_for(user, requests_per_minute=2, tokens_per_minute=10)
    services.admission_count_hit(
        user_id=user.pk, key_id=None, model="local/demo", request_id="h1", now=NOW
    )
    services.admission_count_hit(
        user_id=user.pk, key_id=None, model="local/demo", request_id="h2", now=NOW
    )
    with pytest.raises(QuotaExceeded) as info:
        services.admission_count_hit(
            user_id=user.pk, key_id=None, model="local/demo", request_id="h3", now=NOW
        )
    assert info.value.dimension == "requests_per_minute"
    assert (
        services.quota_standing(user_id=user.pk, now=NOW)["limits"]["tokens_per_minute"]["used"]
        == 0
    )


def test_priorities_share_global_scope_by_headroom(engine, user, plan_for):
    plan_for(user)
    GlobalLimits.objects.update_or_create(pk=1, defaults={"requests_per_hour": 10})
    assert admitted(user, 10, priority="low") == 5
    assert admitted(user, 10, priority="medium") == 2
    assert admitted(user, 10, priority="high") == 2
    assert admitted(user, 10, priority="critical") == 1
    with pytest.raises(QuotaExceeded) as info:
        admit(user, priority="critical")
    assert info.value.scope == "global"


def test_provider_quota_applies_safety_margin(engine, user, plan_for):
    plan_for(user)
    ProviderQuota.objects.create(
        provider="local", model="", requests_per_minute=10, safety_margin="0.80"
    )
    assert admitted(user, 20, priority="critical") == 8


def test_revoked_key_is_refused_at_next_admission(
    engine, user, plan_for, django_capture_on_commit_callbacks
):
    from quotas.errors import KeyRevoked

    plan_for(user)
    _, key = services.key_create(user=user)
    admit(user, key_id=key.pk)
    with django_capture_on_commit_callbacks(execute=True):
        services.key_revoke(key=ApiKey.objects.get(pk=key.pk))
    with pytest.raises(KeyRevoked):
        admit(user, key_id=key.pk)


def traceback_frames(exc):
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_unknown_model_refusal_is_remembered_without_sql(
    engine, user, plan_for, django_assert_num_queries
):
    from config.errors import InvalidRequest

    plan_for(user)
    with pytest.raises(InvalidRequest):
        services.policy_get(user_id=user.pk, key_id=None, model="no-such-model")
    for _ in range(3):
        with django_assert_num_queries(0), pytest.raises(InvalidRequest) as refused:
            services.policy_get(user_id=user.pk, key_id=None, model="no-such-model")
        # A fresh error each time, with its own short traceback.
        assert len(list(traceback_frames(refused.value))) < 5


def test_remembered_refusal_lifts_within_a_second_without_a_bump(engine, user, plan_for):
    """Another worker enabled the model: this one has no admission to learn the new version
    from, so its remembered refusal must expire by itself."""
    from config.errors import InvalidRequest
    from quotas.models import ModelPrice
    from quotas.services import state

    plan_for(user)
    ModelPrice.objects.filter(model="local/demo").update(enabled=False)  # no signal, no bump
    with pytest.raises(InvalidRequest):
        services.policy_get(user_id=user.pk, key_id=None, model="local/demo")
    ModelPrice.objects.filter(model="local/demo").update(enabled=True)
    with pytest.raises(InvalidRequest):  # remembered
        services.policy_get(user_id=user.pk, key_id=None, model="local/demo")
    at = state._state.policies[(user.pk, None, "local/demo")][1]
    # A second later (the entry's age, not the test's clock, is what expires it).
    state._state.policies[(user.pk, None, "local/demo")] = (
        state._state.policies[(user.pk, None, "local/demo")][0],
        at - state._UNCHECKED_TTL,
    )

    policy = services.policy_get(user_id=user.pk, key_id=None, model="local/demo")

    assert policy.model == "local/demo"


@pytest.mark.parametrize("engine", ["local"], indirect=True)
def test_embedded_default_sees_a_limit_changed_by_another_process_within_a_second(
    engine, user, plan_for
):
    """Without Redis there is no shared version: a shell or a command that changes a plan
    (here an UPDATE, which no signal announces) is seen once the cached policy is a second
    old."""
    from quotas.models import Plan
    from quotas.services import state

    plan = plan_for(user, requests_per_minute=60)
    assert services.policy_get(user_id=user.pk, key_id=None, model="local/demo").quotas
    Plan.objects.filter(pk=plan.pk).update(requests_per_minute=2)
    cache_key = (user.pk, None, "local/demo")
    found, at = state._state.policies[cache_key]
    state._state.policies[cache_key] = (found, at - state._UNCHECKED_TTL)  # a second later

    policy = services.policy_get(user_id=user.pk, key_id=None, model="local/demo")

    assert {q.limit for q in policy.quotas if q.dimension == "requests_per_minute"} == {2}


def test_model_refused_by_plan_lifts_at_once_when_the_plan_changes(engine, user, plan_for, save):
    from quotas.errors import ModelNotAllowed

    plan = plan_for(user, allowed_models=["other/model"])
    with pytest.raises(ModelNotAllowed):
        admit(user)
    plan.allowed_models = ["local/demo"]
    save(plan)
    admit(user)


def test_a_policy_read_while_a_change_lands_is_not_kept_under_the_new_version(  # noqa: PLR0917
    engine, user, plan_for, save, monkeypatch, django_user_model
):
    """One thread reads a plan, the operator lowers it, another thread's admission learns
    the new version: what the first read must not stay cached as the new policy."""
    from quotas.services import state

    plan = plan_for(user, requests_per_minute=100)
    other = django_user_model.objects.create(username="other")
    plan_for(other, requests_per_minute=100)
    admit(other)  # this worker knows the current version
    resolve = state.policy_resolve

    def read_while_the_change_lands(**kwargs):
        policy = resolve(**kwargs)  # the plan as it was
        if kwargs["user_id"] == user.pk:
            monkeypatch.setattr(state, "policy_resolve", resolve)
            plan.requests_per_minute = 0  # the operator stops this user
            save(plan)
            admit(other)  # another thread's admission learns of the new version
        return policy

    monkeypatch.setattr(state, "policy_resolve", read_while_the_change_lands)
    admit(user)  # read before the change: this one request may pass

    with pytest.raises(QuotaExceeded):
        admit(user)  # the next reads the plan again


def test_money_is_counted_in_integer_micro_dollars():
    assert usd_to_micros(Decimal("0.0000011")) == 2  # a cost is counted rounded up
    assert usd_to_micros(Decimal("0.000002")) == 2
    assert usd_to_micros(Decimal("5.00")) == 5_000_000


def test_rebuild_counters_command_restores_day_budget_from_ledger(redis_conn, user, plan_for):
    import io

    from django.core.management import call_command

    plan_for(user, tokens_per_day=300)
    a = admit(user, prompt=100, max_tokens=100)
    services.usage_settle(admission=a, prompt_tokens=100, completion_tokens=100, latency_ms=1)
    # Someone tampers with the live counter; the ledger still says 200 tokens.
    for key in redis_conn.keys("tg:q:{u:*}:*:d*"):
        redis_conn.hset(key, "t", 0)
    call_command("rebuild_counters", stdout=io.StringIO())
    with pytest.raises(QuotaExceeded) as info:
        admit(user, prompt=100, max_tokens=100, now=NOW + 1)
    assert info.value.dimension == "tokens_per_day"


def test_next_admission_refunds_abandoned_reservation(engine, user, plan_for, settings):
    settings.QUOTA_LEASE_TTL = 30
    plan_for(user, concurrency=1, tokens_per_day=100)
    admit(user, prompt=40, max_tokens=40)  # never settled
    admit(user, now=NOW + 31, prompt=40, max_tokens=40)  # no explicit sweep
    limits = services.quota_standing(user_id=user.pk, now=NOW + 31)["limits"]
    assert limits["tokens_per_day"]["used"] == 80


def test_same_request_id_in_flight_is_a_409_and_reserves_nothing(engine, user, plan_for):
    from quotas.errors import DuplicateRequest

    plan_for(user, tokens_per_day=1000)
    kwargs = {"user_id": user.pk, "key_id": None, "model": "local/demo", "now": NOW}
    services.admission_admit(request_id="same", prompt_tokens=100, max_tokens=100, **kwargs)
    with pytest.raises(DuplicateRequest) as info:
        services.admission_admit(request_id="same", prompt_tokens=100, max_tokens=100, **kwargs)
    assert info.value.status_code == 409
    assert (
        services.quota_standing(user_id=user.pk, now=NOW)["limits"]["tokens_per_day"]["used"] == 200
    )


def test_sweep_abandons_pending_rows_whose_worker_never_settled(user, settings):
    """Fail-open writes a pending row with the estimate; its worker died before settling.
    Twice the lease's life later the sweep stops it counting and charging; a newer pending
    row (its request may still be running) is left alone. What the counters rebuild from
    is the rest, without the stale copies served past a full quota."""
    from datetime import UTC, datetime, timedelta

    from quotas.services.ledger import ledger_usage

    settings.QUOTA_LEASE_TTL = 300
    at = datetime.fromtimestamp(NOW, tz=UTC)

    def pending(request_id: str, age: timedelta) -> UsageRecord:
        return UsageRecord.objects.create(
            request_id=request_id,
            user=user,
            model="local/demo",
            provider="local",
            prompt_tokens=100,
            completion_tokens=200,
            cost_usd=Decimal("0.000500"),
            outcome=Outcome.PENDING,
            created_at=at - age,
        )

    lost, running = pending("lost", timedelta(minutes=11)), pending("running", timedelta(minutes=2))
    UsageRecord.objects.create(  # a stale copy served past a full quota: no request there
        request_id="stale",
        user=user,
        model="local/demo",
        provider="local",
        cached=True,
        fallback=True,
        outcome=Outcome.CACHED,
        created_at=at,
    )

    assert services.reservations_sweep(now=NOW) >= 1

    lost.refresh_from_db()
    running.refresh_from_db()
    assert (lost.outcome, lost.cost_usd, lost.prompt_tokens) == (Outcome.ABANDONED, 0, 0)
    assert running.outcome == Outcome.PENDING
    requests, tokens, micros = ledger_usage(counter=f"u:{user.pk}", since=at - timedelta(days=1))
    assert (requests, tokens, micros) == (1, 300, 500)  # the running one only


def test_request_in_flight_across_an_epoch_rotation_counts_in_the_new_day(
    redis_conn, user, plan_for
):
    import io
    import time

    from django.core.management import call_command

    now = time.time()  # the day the ledger rows are written in
    plan_for(user, tokens_per_day=1000, requests_per_day=100)
    services.local_state_reset()
    in_flight = admit(user, now=now, prompt=100, max_tokens=100)
    call_command("rebuild_counters", stdout=io.StringIO())  # a new epoch: day rebuilt from
    after = admit(user, now=now, prompt=10, max_tokens=10)  # the ledger, which lacks it yet

    services.usage_settle(admission=in_flight, prompt_tokens=100, completion_tokens=50)

    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert limits["tokens_per_day"]["used"] == 150 + 20  # its actual usage, the other's estimate
    assert limits["requests_per_day"]["used"] == 2
    services.usage_settle(admission=after, prompt_tokens=10, completion_tokens=10)
    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert limits["tokens_per_day"]["used"] == 170
    assert UsageRecord.objects.filter(user=user).count() == 2


def test_request_refunded_across_an_epoch_rotation_leaves_the_new_day_alone(
    redis_conn, user, plan_for
):
    import io
    import time

    from django.core.management import call_command

    now = time.time()
    plan_for(user, tokens_per_day=1000, requests_per_day=100)
    services.local_state_reset()
    in_flight = admit(user, now=now, prompt=100, max_tokens=100)
    call_command("rebuild_counters", stdout=io.StringIO())
    admit(user, now=now, prompt=10, max_tokens=10)

    services.usage_refund(admission=in_flight, outcome="upstream_error")

    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert (limits["tokens_per_day"]["used"], limits["requests_per_day"]["used"]) == (20, 1)


def test_a_day_rebuilt_after_a_rotation_counts_the_requests_still_in_flight(
    redis_conn, user, plan_for
):
    """A rotation's rebuild reads the ledger, which has no row of a request in flight: the
    new day takes its reservation in, so no budget admits past its limit meanwhile, and
    its settlement charges the difference, not the whole."""
    import time

    now = time.time()
    plan_for(user, tokens_per_day=250)
    in_flight = admit(user, now=now, prompt=100, max_tokens=100)  # 200 reserved
    services.counters_rebuild_all()

    with pytest.raises(QuotaExceeded) as refused:
        admit(user, now=now, prompt=50, max_tokens=50)  # 200 + 100 > 250
    services.counters_rebuild_all()  # a second rotation while it still runs
    with pytest.raises(QuotaExceeded):
        admit(user, now=now, prompt=50, max_tokens=50)
    services.usage_settle(admission=in_flight, prompt_tokens=100, completion_tokens=50)
    fits = admit(user, now=now, prompt=50, max_tokens=50)  # 150 + 100 <= 250

    assert refused.value.dimension == "tokens_per_day"
    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert limits["tokens_per_day"]["used"] == 150 + 100  # settled, and reserved
    services.usage_refund(admission=fits, outcome="upstream_error")
    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert (limits["tokens_per_day"]["used"], limits["requests_per_day"]["used"]) == (150, 1)


def test_a_request_settled_before_the_rebuild_counts_in_the_new_day_before_its_row(
    redis_conn, user, plan_for
):
    """A settlement reaches Redis while its ledger INSERT is still on its way (the two
    overlap). If the new epoch's day is rebuilt in between, the ledger lacks the row and
    the reservation is gone: the settlement leaves its actual usage for the rebuild."""
    import time

    from quotas.services.state import backend

    now = time.time()
    plan_for(user, tokens_per_day=240)
    in_flight = admit(user, now=now, prompt=100, max_tokens=100)  # 200 reserved
    services.counters_rebuild_all()
    # Its settlement in Redis, its row not yet committed (the INSERT is what `meanwhile`
    # would run): the new day does not exist yet.
    backend().settle(request_id=in_flight.request_id, tokens=150, cost=0, refund=False)

    with pytest.raises(QuotaExceeded):
        admit(user, now=now, prompt=50, max_tokens=50)  # rebuilt: 150 + 100 > 240
    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert limits["tokens_per_day"]["used"] == 150
    # Sent again (a deferred settlement), it is not counted twice.
    assert not backend().settle(request_id=in_flight.request_id, tokens=150, cost=0, refund=False)
    assert (
        services.quota_standing(user_id=user.pk, now=now)["limits"]["tokens_per_day"]["used"] == 150
    )


def test_a_request_settled_before_the_rebuild_is_counted_once_when_its_row_is_in(
    redis_conn, user, plan_for
):
    import time

    now = time.time()
    plan_for(user, tokens_per_day=1000)
    in_flight = admit(user, now=now, prompt=100, max_tokens=100)
    services.counters_rebuild_all()
    # Settled in Redis and in the ledger before the new day is rebuilt.
    services.usage_settle(admission=in_flight, prompt_tokens=100, completion_tokens=50)

    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert (limits["tokens_per_day"]["used"], limits["requests_per_day"]["used"]) == (150, 1)


def test_a_reservation_taken_in_by_a_rebuild_is_refunded_there_by_the_sweep(
    redis_conn, user, plan_for, settings
):
    import time

    now = time.time()
    plan_for(user, tokens_per_day=1000)
    admit(user, now=now, prompt=100, max_tokens=100)  # its worker dies
    services.counters_rebuild_all()
    admit(user, now=now, prompt=10, max_tokens=10)  # the new day takes the first one in

    services.reservations_sweep(now=now + 2 * settings.QUOTA_LEASE_TTL)

    limits = services.quota_standing(user_id=user.pk, now=now)["limits"]
    assert limits["tokens_per_day"]["used"] == 0  # both leases expired: both given back


def test_fail_open_reads_of_a_global_day_keep_its_older_rows_summed_a_few_seconds(user):
    """Every fail-open admission waits for its global window's read: the day's rows older
    than a few seconds are summed once every few seconds by the process, and only those
    since, or written since, are read each time, with sums equal to a read of the whole
    day; an older row changed in place is seen at the next whole read."""
    from datetime import UTC, datetime

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from quotas.services.ledger import ledger_usages, ledger_usages_failopen
    from quotas.tests.factories import UserFactory

    services.local_state_reset()
    day = datetime.fromtimestamp(NOW, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    spot = ("g", day)
    others = UserFactory()

    def row(owner, at, tokens):
        UsageRecord.objects.create(
            request_id=f"r{UsageRecord.objects.count()}",
            user=owner,
            model="local/demo",
            provider="local",
            prompt_tokens=tokens,
            completion_tokens=0,
            cost_usd=Decimal("0.000010"),
            outcome=Outcome.OK,
            created_at=datetime.fromtimestamp(at, tz=UTC),
        )

    def read(now):
        with CaptureQueriesContext(connection) as queries:
            sums = ledger_usages_failopen([spot], calendar=[spot], now=now)[spot]
        assert len(queries) == 1
        return sums, queries[0]["sql"]

    row(user, NOW - 3600, 100)
    row(others, NOW - 1, 10)
    first, sql = read(NOW)  # the whole day, once
    assert first == ledger_usage_of(spot) == (2, 110, 20)
    assert "00:00:00" in sql  # from midnight on
    kept_from = datetime.fromtimestamp(NOW - 5, tz=UTC).strftime("%H:%M:%S")

    row(others, NOW + 1, 7)  # a request settled since: read as it comes
    kept, sql = read(NOW + 2)
    assert kept == ledger_usage_of(spot) == (3, 117, 30)
    # Everyone's rows since the kept sums' cut, a few seconds back, and those written since.
    assert kept_from in sql

    row(user, NOW - 1800, 1000)  # written long after its time (replayed from the spool)
    assert read(NOW + 3)[0] == ledger_usage_of(spot) == (4, 1117, 40)
    UsageRecord.objects.filter(prompt_tokens=100).update(outcome=Outcome.ABANDONED)
    assert read(NOW + 4)[0] == (4, 1117, 40)  # an older row changed: seen at the next
    assert read(NOW + 6)[0] == ledger_usage_of(spot) == (3, 1017, 30)  # whole read

    assert ledger_usages([spot])[spot] == (3, 1017, 30)


def ledger_usage_of(spot):
    from quotas.services.ledger import ledger_usage

    return ledger_usage(counter=spot[0], since=spot[1])


def test_ledger_sums_of_several_principals_and_windows_come_from_one_statement(user, api_key):
    """What a fail-open admission reads under its principals' locks: each (counter, since)
    summed as `ledger_usage` sums it alone (the global scope over everyone, the provider's
    over its model, a refused stale copy and an older row left out), in one statement."""
    from datetime import UTC, datetime, timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from quotas.services.ledger import ledger_usage, ledger_usages
    from quotas.tests.factories import UserFactory

    at = datetime.fromtimestamp(NOW, tz=UTC)
    other = UserFactory()
    _, key = api_key

    def row(owner, *, age=timedelta(0), key=None, model="local/demo", **fields):
        return UsageRecord.objects.create(
            request_id=f"r{UsageRecord.objects.count()}",
            user=owner,
            api_key=key,
            model=model,
            provider="local",
            prompt_tokens=fields.pop("prompt", 10),
            completion_tokens=fields.pop("completion", 20),
            cost_usd=fields.pop("cost", Decimal("0.000100")),
            outcome=fields.pop("outcome", Outcome.OK),
            created_at=at - age,
            **fields,
        )

    row(user, key=key)
    row(user, age=timedelta(hours=30), prompt=1000)  # outside the day, inside the month
    row(user, model="local/other", cost=Decimal("0.000250"))
    row(other, prompt=7, completion=0, cost=Decimal("0.000007"))
    row(other, cached=True, fallback=True, outcome=Outcome.CACHED)  # a refused stale copy
    row(other, outcome=Outcome.UPSTREAM_ERROR, cost=Decimal(0))  # refunded: not counted

    day, month = at - timedelta(hours=1), at - timedelta(days=3)
    spots = [
        (f"u:{user.pk}", day),
        (f"u:{user.pk}", month),
        (f"k:{key.pk}", day),
        (f"u:{other.pk}", day),
        ("g", day),
        ("g", month),
        ("p:local:local/demo", day),
        ("p:local:*", month),
    ]
    with CaptureQueriesContext(connection) as queries:
        together = ledger_usages(spots + spots[:2])  # a pair asked twice is summed once
    assert len(queries) == 1
    assert together == {
        (f"u:{user.pk}", day): (2, 60, 350),
        (f"u:{user.pk}", month): (3, 1080, 450),
        (f"k:{key.pk}", day): (1, 30, 100),
        (f"u:{other.pk}", day): (1, 7, 7),
        ("g", day): (3, 67, 357),
        ("g", month): (4, 1087, 457),
        ("p:local:local/demo", day): (2, 37, 107),
        ("p:local:*", month): (4, 1087, 457),
    }
    assert together == {spot: ledger_usage(counter=spot[0], since=spot[1]) for spot in spots}
    assert ledger_usages([]) == {}


def test_admit_counts_a_new_utc_day_in_a_new_counter_with_the_same_policy(
    redis_conn, user, plan_for
):
    # The counter keys of a policy's quotas are kept for the day (RedisQuotaBackend): the
    # first request after midnight must count in the new day's counter, not in the kept one.
    plan_for(user, requests_per_day=2)
    midnight = (NOW // 86400 + 1) * 86400
    assert admitted(user, 3, now=midnight - 30) == 2
    assert admitted(user, 3, now=midnight + 30) == 2
    days = {k.decode().rsplit(":", 1)[-1] for k in redis_conn.keys("tg:q:{u:*:d*")}
    assert len(days) == 2
