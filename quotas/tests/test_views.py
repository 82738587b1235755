"""The HTTP contract of API.md for authentication, quotas and their headers."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.db import connection
from django.utils import timezone

from quotas import services
from quotas.models import GlobalLimits, UserQuota

pytestmark = pytest.mark.django_db

GENERATE = "/api/v1/generate"


def auth(key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def generate(client, key, **body):
    return client.post(
        GENERATE, {"prompt": "hello", "max_tokens": 8, **body}, format="json", **auth(key)
    )


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert response["X-Request-ID"]
    if status == 401:  # RFC 9110: a 401 names the scheme to authenticate with
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    return body["error"]


def test_no_credentials_is_401_authentication_failed(api_client):
    assert_error(api_client.get("/api/v1/quota"), 401, "authentication_failed")


def test_unknown_and_malformed_keys_are_401(api_client, api_key, local_model):
    full, _ = api_key
    tampered = full[:-4] + ("aaaa" if not full.endswith("aaaa") else "bbbb")
    assert_error(api_client.get("/api/v1/quota", **auth(tampered)), 401, "authentication_failed")
    assert_error(api_client.get("/api/v1/quota", **auth("tg_nope")), 401, "authentication_failed")


def test_revoked_key_is_401_key_revoked(api_client, api_key):
    full, key = api_key
    services.key_revoke(key=key)
    assert_error(api_client.get("/api/v1/quota", **auth(full)), 401, "key_revoked")


def test_expired_key_is_401_key_expired(api_client, user):
    full, _ = services.key_create(user=user, expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert_error(api_client.get("/api/v1/quota", HTTP_X_API_KEY=full), 401, "key_expired")


def test_a_401_names_the_bearer_scheme_on_the_openai_compatible_endpoint_too(api_client):
    response = api_client.post(
        "/v1/chat/completions",
        {"model": "local/test", "messages": [{"role": "user", "content": "hi"}]},
        format="json",
        HTTP_AUTHORIZATION="Bearer tg_nope",
    )
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_inactive_user_is_401_user_inactive(api_client, api_key):
    full, key = api_key
    key.user.is_active = False
    key.user.save()
    assert_error(api_client.get("/api/v1/quota", **auth(full)), 401, "user_inactive")


def test_drf_token_authenticates(api_client, user, local_model):
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=user)
    response = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200
    assert response.json()["key"] is None


def test_staff_endpoint_is_403_permission_denied_for_others(api_client, api_key):
    full, _ = api_key
    response = api_client.get("/api/v1/quota/global", **auth(full))
    error = assert_error(response, 403, "permission_denied")
    assert error["message"] == "This endpoint is for staff only."


def test_model_not_allowed_for_plan_is_403(api_client, api_key, plan_for):
    full, key = api_key
    plan_for(key.user, allowed_models=["local/other"])
    assert_error(generate(api_client, full), 403, "permission_denied")


def test_quota_exceeded_is_429_with_every_header_and_detail(
    api_client, api_key, plan_for, redis_conn
):
    full, key = api_key
    plan_for(key.user, requests_per_minute=2)
    for _ in range(2):
        ok = generate(api_client, full, cache="bypass")
        assert ok.status_code == 200, ok.content
        assert ok["X-RateLimit-Limit-Requests"] == "2"
    response = generate(api_client, full, cache="bypass")
    err = assert_error(response, 429, "quota_exceeded")
    assert err["scope"] == "plan"
    assert err["dimension"] == "requests_per_minute"
    assert err["limit"] == 2
    assert err["retry_after"] >= 1
    assert int(response["Retry-After"]) == err["retry_after"]
    assert response["RateLimit-Policy"] == '"rpm";q=2;w=60'
    assert response["RateLimit"].startswith('"rpm";r=0;t=')
    assert response["X-RateLimit-Remaining-Requests"] == "0"
    assert response["X-RateLimit-Reset-Requests"].endswith("s")


def test_quota_standing_shape_and_headers(api_client, api_key, plan_for, redis_conn):
    full, key = api_key
    plan_for(
        key.user, requests_per_minute=60, cost_per_day="5.00", concurrency=4, tokens_per_day=1000
    )
    assert generate(api_client, full, cache="bypass").status_code == 200
    response = api_client.get("/api/v1/quota", **auth(full))
    assert response.status_code == 200
    body = response.json()
    assert body["user"] == key.user.username
    assert body["key"] == f"tg_{key.prefix}"
    limits = body["limits"]
    assert limits["requests_per_minute"]["limit"] == 60
    assert limits["requests_per_minute"]["used"] == 1
    assert limits["requests_per_minute"]["remaining"] == 59
    assert 0 < limits["requests_per_minute"]["reset_in"] <= 65
    assert limits["cost_per_day"]["limit"] == "5.00"
    # Unlimited: no limit, and what was used all the same (the ledger's count).
    assert limits["requests_per_hour"] == {
        "limit": None,
        "used": 1,
        "remaining": None,
        "reset_in": 0,
    }
    month = limits["cost_per_month"]
    assert (month["limit"], month["remaining"]) == (None, None)
    assert month["used"] == limits["cost_per_day"]["used"] != "0.00"
    assert month["reset_in"] >= limits["cost_per_day"]["reset_in"] > 0
    assert limits["concurrency"] == {"limit": 4, "used": 0, "remaining": 4}
    assert response["RateLimit-Policy"] == '"rpm";q=60;w=60'
    assert response["X-RateLimit-Remaining-Requests"] == "59"
    assert response["X-RateLimit-Limit-Tokens"] == "1000"


def test_global_standing_gives_concurrency_no_reset_in_as_the_callers_standing_does(
    api_client, api_key, plan_for, redis_conn
):
    full, key = api_key
    plan_for(key.user, concurrency=4)
    GlobalLimits.objects.update_or_create(
        pk=1, defaults={"concurrency": 10, "requests_per_hour": 100}
    )
    staff = type(key.user).objects.create_user("ops", is_staff=True)
    assert generate(api_client, full, cache="bypass").status_code == 200
    own = api_client.get("/api/v1/quota", **auth(full)).json()["limits"]
    api_client.force_authenticate(staff)

    shared = api_client.get("/api/v1/quota/global").json()["global"]

    # A count of requests in flight has no window to reset: no reset_in, in either body.
    assert own["concurrency"] == {"limit": 4, "used": 0, "remaining": 4}
    assert shared["concurrency"] == {"limit": 10, "used": 0, "remaining": 10}
    assert shared["requests_per_hour"]["used"] == 1
    assert 0 < shared["requests_per_hour"]["reset_in"] <= 3600 + 300  # a bucket late at most


def test_schema_describes_each_global_and_provider_limit_with_reset_in_optional(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    schemas = schema["components"]["schemas"]

    standing = schemas["LimitStanding"]
    glob = schemas["QuotaGlobalOutput"]["properties"]
    own = schemas["QuotaStandingOutput"]["properties"]["limits"]
    assert "reset_in" in standing["properties"]
    assert "reset_in" not in standing["required"]
    assert "concurrency" in standing["properties"]["reset_in"]["description"]
    ref = {"$ref": "#/components/schemas/LimitStanding"}
    assert own["additionalProperties"] == ref
    assert glob["global"]["additionalProperties"] == ref
    assert glob["providers"]["additionalProperties"]["additionalProperties"] == ref


def test_suspended_user_is_refused_with_its_headers_and_sees_its_real_standing(
    api_client, api_key, plan_for, redis_conn, django_capture_on_commit_callbacks
):
    full, key = api_key
    plan_for(key.user, requests_per_minute=60, tokens_per_day=1000)
    assert generate(api_client, full, cache="bypass").status_code == 200
    quota = UserQuota.objects.get(user=key.user)
    quota.suspended = True
    with django_capture_on_commit_callbacks(execute=True):  # as the admin's save commits
        quota.save()

    refused = generate(api_client, full, prompt="again")
    standing = api_client.get("/api/v1/quota", **auth(full))

    assert_error(refused, 403, "permission_denied")
    assert refused["X-RateLimit-Remaining-Requests"] == "59"
    body = standing.json()
    assert body["suspended"] is True
    assert body["limits"]["requests_per_minute"]["limit"] == 60  # not "unlimited"
    assert body["limits"]["requests_per_minute"]["used"] == 1
    assert body["limits"]["tokens_per_day"]["limit"] == 1000
    # Its other requests, the ledger and jobs included, are refused as well.
    for path in ("/api/v1/usage", "/v1/models", f"/api/v1/jobs/{uuid.uuid4()}"):
        assert_error(api_client.get(path, **auth(full)), 403, "permission_denied")
    quota.suspended = False
    with django_capture_on_commit_callbacks(execute=True):
        quota.save()
    assert api_client.get("/api/v1/usage", **auth(full)).status_code == 200


@pytest.mark.usefixtures("redis_conn")
@pytest.mark.parametrize("default_model", ["not/in-the-catalogue", "local/demo"])
def test_standing_and_headers_do_not_hang_on_the_default_model(
    api_client, api_key, plan_for, settings, default_model
):
    """A deployment whose default model is not in its catalogue, or a plan that does not
    allow the default model, still shows the caller its limits, and every authenticated
    response still carries its rate-limit headers (API.md)."""
    full, key = api_key
    plan_for(key.user, requests_per_minute=60, allowed_models=["other/model"])
    settings.TOLLGATE_DEFAULT_MODEL = default_model

    standing = api_client.get("/api/v1/quota", **auth(full))
    refused = api_client.post(GENERATE, {"max_tokens": 8}, format="json", **auth(full))

    assert standing.status_code == 200
    assert standing.json()["plan"] == key.user.quota.plan.name
    assert standing.json()["limits"]["requests_per_minute"]["limit"] == 60
    assert refused.status_code == 400
    for response in (standing, refused):
        assert response["RateLimit-Policy"] == '"rpm";q=60;w=60'
        assert response["X-RateLimit-Limit-Requests"] == "60"


def test_usage_rejects_bad_dates_with_invalid_request(api_client, api_key):
    full, _ = api_key
    response = api_client.get("/api/v1/usage?start=2026-13-01", **auth(full))
    err = assert_error(response, 400, "invalid_request")
    assert "start" in err["fields"]


def test_usage_of_another_user_is_staff_only(api_client, api_key):
    full, _ = api_key
    assert_error(
        api_client.get("/api/v1/usage?user=someone", **auth(full)), 403, "permission_denied"
    )


def test_staff_reads_another_users_usage_by_username(api_client):
    from quotas.models import UsageRecord
    from quotas.tests.factories import UserFactory

    staff, other = UserFactory(is_staff=True), UserFactory(username="carol")
    for user, tokens in ((staff, 1), (other, 7), (other, 5)):
        UsageRecord.objects.create(
            request_id=f"r-{user.pk}-{tokens}",
            user=user,
            model="local/demo",
            provider="local",
            prompt_tokens=tokens,
        )
    staff_key, _ = services.key_create(user=staff, name="ops")

    response = api_client.get("/api/v1/usage?user=carol", **auth(staff_key))

    assert response.status_code == 200, response.content
    totals = response.json()["totals"]
    assert (totals["requests"], totals["prompt_tokens"]) == (2, 12)


def test_staff_asking_for_an_unknown_user_is_400(api_client):
    from quotas.tests.factories import UserFactory

    staff_key, _ = services.key_create(user=UserFactory(is_staff=True), name="ops")

    err = assert_error(
        api_client.get("/api/v1/usage?user=nobody", **auth(staff_key)), 400, "invalid_request"
    )
    assert err["fields"] == {"user": ["Unknown user."]}


def test_failed_authentications_are_rate_limited_per_address(api_client, settings):
    from quotas import auth_throttle

    settings.AUTH_FAILURES_PER_MINUTE = 3
    auth_throttle.reset()
    bad = "tg_abcdefgh_" + "x" * 43
    codes = [api_client.get("/api/v1/quota", **auth(bad)).json()["error"]["code"] for _ in range(5)]
    assert codes[:3] == ["authentication_failed"] * 3
    assert codes[3:] == ["too_many_authentication_failures"] * 2
    auth_throttle.reset()


def test_a_valid_key_from_a_blocked_address_still_gets_through(api_client, api_key, settings):
    # Many clients share one address behind a NAT or a proxy: one's bad keys must not lock
    # the others out.
    from quotas import auth_throttle

    settings.AUTH_FAILURES_PER_MINUTE = 2
    auth_throttle.reset()
    bad = "tg_abcdefgh_" + "x" * 43
    for _ in range(3):
        api_client.get("/api/v1/quota", **auth(bad))

    blocked = api_client.get("/api/v1/quota", **auth(bad))
    malformed = api_client.get("/api/v1/quota", **auth("nonsense"))
    valid = api_client.get("/api/v1/quota", **auth(api_key[0]))

    assert_error(blocked, 429, "too_many_authentication_failures")
    assert_error(malformed, 429, "too_many_authentication_failures")
    assert valid.status_code == 200, valid.content
    auth_throttle.reset()


def test_failed_token_authentications_count_against_the_same_throttle_as_bad_keys(
    api_client, api_key, user, settings, redis_conn
):
    from rest_framework.authtoken.models import Token

    from quotas import auth_throttle

    settings.AUTH_FAILURES_PER_MINUTE = 3
    auth_throttle.reset()
    token = Token.objects.create(user=user)
    bad_key = auth("tg_abcdefgh_" + "x" * 43)
    unknown_token = {"HTTP_AUTHORIZATION": "Token " + "0" * 40}
    malformed_token = {"HTTP_AUTHORIZATION": "Token two words"}

    counted = [
        api_client.get("/api/v1/quota", **credentials)
        for credentials in (bad_key, unknown_token, malformed_token)
    ]
    past_the_limit = api_client.get("/api/v1/quota", **unknown_token)
    blocked_key = api_client.get("/api/v1/quota", **bad_key)
    valid_token = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Token {token.key}")
    valid_key = api_client.get("/api/v1/quota", **auth(api_key[0]))

    assert [r.json()["error"]["code"] for r in counted] == ["authentication_failed"] * 3
    for refused in (past_the_limit, blocked_key):
        assert_error(refused, 429, "too_many_authentication_failures")
        assert 1 <= int(refused["Retry-After"]) <= 60
        assert refused.json()["error"]["retry_after"] == int(refused["Retry-After"])
    assert valid_token.status_code == 200, valid_token.content
    assert valid_key.status_code == 200, valid_key.content
    auth_throttle.reset()


def test_database_holds_no_api_key_secret(api_key):
    full, _ = api_key
    secret = full.split("_", 2)[2]
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        for table in tables:
            columns = [
                c.name for c in connection.introspection.get_table_description(cursor, table)
            ]
            for column in columns:
                cursor.execute(
                    f'SELECT COUNT(*) FROM "{table}" WHERE CAST("{column}" AS TEXT) LIKE %s',  # noqa: S608
                    [f"%{secret}%"],
                )
                assert cursor.fetchone()[0] == 0, f"{table}.{column} holds the secret"


def test_last_used_is_written_at_most_once_a_minute(api_client, api_key):
    full, key = api_key
    api_client.get("/api/v1/quota", **auth(full))
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None
    api_client.get("/api/v1/quota", **auth(full))
    key.refresh_from_db()
    assert key.last_used_at == first


def test_quota_standing_answers_if_none_match_with_304(api_client, api_key, plan_for, redis_conn):
    full, key = api_key
    plan_for(key.user, requests_per_minute=60)
    first = api_client.get("/api/v1/quota", **auth(full))
    assert "private" in first["Cache-Control"]
    etag = first["ETag"]
    again = api_client.get("/api/v1/quota", HTTP_IF_NONE_MATCH=etag, **auth(full))
    assert again.status_code == 304
    assert generate(api_client, full, cache="bypass").status_code == 200
    changed = api_client.get("/api/v1/quota", HTTP_IF_NONE_MATCH=etag, **auth(full))
    assert changed.status_code == 200
    assert changed["ETag"] != etag


def test_key_scopes_limit_the_endpoints_a_key_may_call(api_client, user, local_model, redis_conn):
    usage_only, _ = services.key_create(user=user, scopes=["usage"])
    generate_only, _ = services.key_create(user=user, scopes=["generate", "model:local/demo"])
    models_only, _ = services.key_create(user=user, scopes=["model:local/demo"])
    assert_error(generate(api_client, usage_only), 403, "permission_denied")
    assert api_client.get("/api/v1/quota", **auth(usage_only)).status_code == 200
    assert generate(api_client, generate_only).status_code == 200
    assert_error(api_client.get("/api/v1/usage", **auth(generate_only)), 403, "permission_denied")
    assert api_client.get("/api/v1/quota", **auth(generate_only)).status_code == 200
    # Model scopes alone restrict models, not endpoints.
    assert generate(api_client, models_only).status_code == 200
    assert api_client.get("/api/v1/quota", **auth(models_only)).status_code == 200


def test_a_staff_users_scoped_key_cannot_call_the_staff_endpoints(api_client, redis_conn):
    # A staff member's key made for an application (`generate`) or a report (`usage`) may
    # call what its scopes name, not flush the cache or read every user's shared standing:
    # only a key without endpoint scopes may call everything.
    from quotas.tests.factories import UserFactory

    staff = UserFactory(is_staff=True)
    unscoped, _ = services.key_create(user=staff, name="ops")
    models_only, _ = services.key_create(user=staff, scopes=["model:local/demo"])
    for scopes in (["generate"], ["usage"], ["generate", "usage"]):
        scoped, _ = services.key_create(user=staff, scopes=scopes)
        invalidate = api_client.post(
            "/api/v1/cache/invalidate", {"pattern": "topic:*"}, format="json", **auth(scoped)
        )
        assert_error(invalidate, 403, "permission_denied")
        for path in ("/api/v1/cache/stats", "/api/v1/quota/global"):
            err = assert_error(api_client.get(path, **auth(scoped)), 403, "permission_denied")
            assert "scope" in err["message"]
    for key in (unscoped, models_only):
        for path in ("/api/v1/cache/stats", "/api/v1/quota/global"):
            assert api_client.get(path, **auth(key)).status_code == 200


def test_a_staff_users_scoped_key_reads_its_own_usage_and_jobs_only(api_client, redis_conn):
    # Nor may it read other users' usage or jobs: a `usage` key made for a dashboard reads
    # its own user's, as a non-staff user's would. An unscoped key keeps staff's reach.
    from generation.models import Job
    from quotas.tests.factories import UserFactory

    staff, other = UserFactory(is_staff=True), UserFactory(username="carol")
    job = Job.objects.create(user=other, request={"topic": "t", "subtopics": ["a"]})
    unscoped, _ = services.key_create(user=staff, name="ops")
    for scopes in (["usage"], ["generate", "usage"]):
        scoped, _ = services.key_create(user=staff, scopes=scopes)
        usage = api_client.get("/api/v1/usage?user=carol", **auth(scoped))
        assert_error(usage, 403, "permission_denied")
        assert api_client.get("/api/v1/usage", **auth(scoped)).status_code == 200
        assert_error(api_client.get(f"/api/v1/jobs/{job.id}", **auth(scoped)), 404, "not_found")
    assert api_client.get("/api/v1/usage?user=carol", **auth(unscoped)).status_code == 200
    assert api_client.get(f"/api/v1/jobs/{job.id}", **auth(unscoped)).status_code == 200


def test_a_limit_another_worker_changed_shows_in_the_standing_at_once(
    api_client, api_key, user, plan_for, redis_conn
):
    key, _ = api_key
    plan = plan_for(user, requests_per_minute=10)
    first = api_client.get("/api/v1/quota", **auth(key))
    assert first.json()["limits"]["requests_per_minute"]["limit"] == 10

    # Another worker saves the plan: the row changes, and it announces a new policy version
    # in Redis; this process's cached policy is left as it was.
    type(plan).objects.filter(pk=plan.pk).update(requests_per_minute=11)
    services.backend().bump_version()

    response = api_client.get("/api/v1/quota", **auth(key))
    assert response.json()["limits"]["requests_per_minute"]["limit"] == 11
    assert response["RateLimit-Policy"] == '"rpm";q=11;w=60'


def test_a_new_worker_after_rebuild_counters_shows_the_days_use_from_the_ledger(
    api_client, api_key, user, plan_for, redis_conn
):
    key, _ = api_key
    plan_for(user, requests_per_day=100, cost_per_day="5.00")
    assert generate(api_client, key, prompt="counted", cache="bypass").status_code == 200

    services.counters_rebuild_all()  # manage.py rebuild_counters: a new counter epoch
    services.local_state_reset()  # a worker started since: it knows nothing yet

    limits = api_client.get("/api/v1/quota", **auth(key)).json()["limits"]
    assert limits["requests_per_day"]["used"] == 1
    assert limits["cost_per_day"]["used"] != "0.00"


def test_remaining_tokens_of_an_answer_count_the_tokens_used_not_the_reservation(
    api_client, api_key, user, plan_for, redis_conn
):
    key, _ = api_key
    plan_for(user, requests_per_minute=100, tokens_per_minute=10_000)
    response = generate(api_client, key, prompt="a short one", max_tokens=500, cache="bypass")
    assert response.status_code == 200, response.content
    used = response.json()["usage"]["total_tokens"]
    assert used < 500  # the reservation held all of max_tokens

    standing = api_client.get("/api/v1/quota", **auth(key)).json()["limits"]
    assert standing["tokens_per_minute"]["used"] == used
    assert response["X-RateLimit-Remaining-Tokens"] == str(10_000 - used)


def test_reset_headers_are_written_as_openai_writes_them():
    from quotas.services.admission import _duration

    assert [_duration(s) for s in (0, 17, 60, 360, 3599, 3600, 29958)] == [
        "0s",
        "17s",
        "1m0s",
        "6m0s",
        "59m59s",
        "1h0m0s",
        "8h19m18s",
    ]
