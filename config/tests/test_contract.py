"""The public contract (API.md) as the engineers who call Tollgate rely on it: the points
that no app's own tests pin down. Runs against the real PostgreSQL and Redis, with the
offline `local` provider."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from quotas.tests.factories import PlanFactory, UserQuotaFactory

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
RATE_LIMIT_HEADERS = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit-Requests",
    "X-RateLimit-Remaining-Requests",
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Requests",
)
DECIMAL_STRING = re.compile(r"^\d+(\.\d+)?$")


@pytest.fixture
def client_with_key(api_client, api_key, local_model, redis_conn):
    full, key = api_key
    UserQuotaFactory(
        user=key.user, plan=PlanFactory(requests_per_minute=60, tokens_per_day=100_000)
    )
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full}")
    return api_client


@pytest.fixture
def staff_client(api_client, local_model, redis_conn):
    staff = get_user_model().objects.create_user("ops", password="x", is_staff=True)
    api_client.force_authenticate(staff)
    return api_client


def _generate(client, **body):
    return client.post("/api/v1/generate", {"prompt": "hi", **body}, format="json")


def _assert_rate_limit_headers(response) -> None:
    missing = [h for h in RATE_LIMIT_HEADERS if not response.has_header(h)]
    assert not missing, f"{response.status_code} lacks {missing}"


def test_generate_response_has_every_field_with_its_type(client_with_key):
    response = _generate(client_with_key, cache="bypass")

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) >= {
        "id", "request_id", "model", "text", "usage", "cost_usd", "cached", "cache_layer",
        "fallback",
    }  # fmt: skip
    assert body["model"] == "local/demo"
    assert body["request_id"] == response["X-Request-ID"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(body["cost_usd"], str)
    assert DECIMAL_STRING.match(body["cost_usd"])
    assert Decimal(body["cost_usd"]) > 0
    assert body["cached"] is False
    assert body["cache_layer"] is None
    assert body["fallback"] is False


def test_generate_x_cache_is_miss_then_hit_with_a_cache_layer(client_with_key):
    first = _generate(client_with_key, prompt="cache me")
    second = _generate(client_with_key, prompt="cache me")

    assert first["X-Cache"] == "MISS"
    assert second["X-Cache"] == "HIT"
    body = second.json()
    assert body["cached"] is True
    assert body["cache_layer"] in ("memory", "redis")
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert body["cost_usd"] == "0"


def test_generate_cache_bypass_is_x_cache_bypass(client_with_key):
    response = _generate(client_with_key, cache="bypass")

    assert response["X-Cache"] == "BYPASS"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/generate", {"prompt": "pay once"}),
        (
            "/v1/chat/completions",
            {"model": "local/demo", "messages": [{"role": "user", "content": "pay once"}]},
        ),
    ],
)
def test_idempotent_replay_carries_the_rate_limit_headers_of_now(client_with_key, path, body):
    """A replay returns the first answer, not the first answer's standing: the requests
    made since count in its headers (the replay itself is not counted)."""
    first = client_with_key.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="order-42")
    for n in range(3):
        assert _generate(client_with_key, prompt=f"other {n}").status_code == 200

    replay = client_with_key.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="order-42")

    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    assert first["X-RateLimit-Remaining-Requests"] == "59"
    assert replay["X-RateLimit-Remaining-Requests"] == "56"
    assert replay["RateLimit"].startswith('"rpm";r=56;')
    assert replay["X-Cache"] == first["X-Cache"]


def test_generate_messages_instead_of_prompt_is_accepted(client_with_key):
    response = client_with_key.post(
        "/api/v1/generate",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ]
        },
        format="json",
    )

    assert response.status_code == 200, response.content


def test_generate_neither_prompt_nor_messages_lists_the_fields(client_with_key):
    response = client_with_key.post("/api/v1/generate", {"max_tokens": 10}, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["fields"], dict)
    assert error["fields"]
    assert all(isinstance(v, list) for v in error["fields"].values())


def test_generate_validation_error_carries_rate_limit_and_request_id_headers(client_with_key):
    response = client_with_key.post("/api/v1/generate", {}, format="json")

    assert response.status_code == 400
    _assert_rate_limit_headers(response)
    assert response["X-Request-ID"]


def test_unauthenticated_api_error_has_request_id_and_contract_shape(api_client, db):
    response = api_client.get("/api/v1/quota")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"
    assert response["X-Request-ID"]


def test_client_request_id_is_echoed_back(client_with_key):
    response = client_with_key.get("/api/v1/quota", HTTP_X_REQUEST_ID="abc-123-def")

    assert response["X-Request-ID"] == "abc-123-def"


@pytest.mark.parametrize(
    "path", ["/health/live", "/health/startup", "/metrics", "/api/schema/", "/api/v1/nowhere"]
)
def test_every_response_has_a_request_id(client, path):
    response = client.get(path)

    assert response["X-Request-ID"]


def test_subtopics_response_shape_and_rate_limit_headers(client_with_key):
    response = client_with_key.post(
        "/api/v1/topics/subtopics", {"topic": "Python programming", "count": 3}, format="json"
    )

    assert response.status_code == 200, response.content
    _assert_rate_limit_headers(response)
    body = response.json()
    assert set(body) >= {"topic", "nodes", "edges", "usage", "cost_usd", "cached", "fallback"}
    assert body["topic"] == "Python programming"
    root = body["nodes"][0]
    assert root["label"] == "Python programming"
    children = [n["id"] for n in body["nodes"][1:]]
    assert len(children) == 3
    assert {(e["source"], e["target"]) for e in body["edges"]} >= {
        (root["id"], c) for c in children
    }
    assert isinstance(body["cost_usd"], str)
    assert body["cached"] is False
    assert body["fallback"] is False


@pytest.mark.parametrize("count", [3, 12])
def test_subtopics_count_bounds_are_inclusive(client_with_key, count):
    response = client_with_key.post(
        "/api/v1/topics/subtopics", {"topic": f"Bounds {count}", "count": count}, format="json"
    )

    assert response.status_code == 200, response.content
    assert len(response.json()["nodes"]) == count + 1


def test_subtopics_count_defaults_to_six(client_with_key):
    response = client_with_key.post(
        "/api/v1/topics/subtopics", {"topic": "Default count"}, format="json"
    )

    assert response.status_code == 200, response.content
    assert len(response.json()["nodes"]) == 7


@pytest.mark.django_db(transaction=True)  # items run on pool threads with their own connections
def test_explanations_response_shape(client_with_key):
    response = client_with_key.post(
        "/api/v1/topics/explanations",
        {"topic": "Python", "subtopics": ["Decorators", "Generators"]},
        format="json",
    )

    assert response.status_code == 200, response.content
    _assert_rate_limit_headers(response)
    body = response.json()
    assert set(body) >= {"items", "usage", "cost_usd"}
    assert [i["subtopic"] for i in body["items"]] == ["Decorators", "Generators"]
    for item in body["items"]:
        assert item["explanation"]
        assert item["cached"] is False
        assert item["error"] is None
    assert isinstance(body["cost_usd"], str)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("subtopics", [[], [f"s{i}" for i in range(20)]])
def test_explanations_subtopics_bounds(client_with_key, subtopics):
    response = client_with_key.post(
        "/api/v1/topics/explanations", {"topic": "T", "subtopics": subtopics}, format="json"
    )

    if subtopics:
        assert response.status_code == 200, response.content
        assert len(response.json()["items"]) == 20
    else:
        assert response.status_code == 400
        assert "subtopics" in response.json()["error"]["fields"]


def test_chat_completion_has_openai_shape_and_rate_limit_headers(client_with_key):
    response = client_with_key.post(
        "/v1/chat/completions",
        {"model": "local/demo", "messages": [{"role": "user", "content": "hi"}]},
        format="json",
    )

    assert response.status_code == 200, response.content
    _assert_rate_limit_headers(response)
    assert response["X-Request-ID"]
    assert response["X-Cache"] in ("HIT", "MISS", "BYPASS")
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_chat_completion_without_credentials_is_openai_shaped_401(api_client, db):
    response = api_client.post(
        "/v1/chat/completions",
        {"model": "local/demo", "messages": [{"role": "user", "content": "hi"}]},
        format="json",
    )

    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert response["X-Request-ID"]


def test_chat_completion_bad_body_is_openai_shaped_400(client_with_key):
    response = client_with_key.post("/v1/chat/completions", {"model": "local/demo"}, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == "invalid_request"


def test_chat_completion_quota_exceeded_is_openai_shaped_429_with_headers(
    api_client, api_key, local_model, redis_conn
):
    full, key = api_key
    UserQuotaFactory(user=key.user, plan=PlanFactory(requests_per_minute=1))
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full}")
    body = {"model": "local/demo", "messages": [{"role": "user", "content": "hi"}]}
    assert api_client.post("/v1/chat/completions", body, format="json").status_code == 200

    response = api_client.post(
        "/v1/chat/completions",
        {**body, "messages": [{"role": "user", "content": "other"}]},
        format="json",
    )

    assert response.status_code == 429
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == "quota_exceeded"
    assert int(response["Retry-After"]) >= 1
    assert response["X-RateLimit-Remaining-Requests"] == "0"
    assert response["RateLimit-Policy"] == '"rpm";q=1;w=60'


def test_usage_body_has_rows_and_totals_with_money_as_strings(client_with_key):
    assert _generate(client_with_key, cache="bypass").status_code == 200

    for group_by in ("day", "model", "key"):
        response = client_with_key.get("/api/v1/usage", {"group_by": group_by})
        assert response.status_code == 200, response.content
        _assert_rate_limit_headers(response)
        body = response.json()
        assert len(body["rows"]) == 1
        row = body["rows"][0]
        assert set(row) >= {
            "group", "requests", "cached", "prompt_tokens", "completion_tokens", "cost_usd"
        }  # fmt: skip
        assert row["requests"] == 1
        assert isinstance(row["cost_usd"], str)
        assert Decimal(row["cost_usd"]) > 0
        assert body["totals"]["requests"] == 1
    assert response.json()["rows"][0]["group"] is not None


def test_usage_bad_group_by_is_invalid_request(client_with_key):
    response = client_with_key.get("/api/v1/usage", {"group_by": "planet"})

    assert response.status_code == 400
    assert "group_by" in response.json()["error"]["fields"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"start": "2026-1-1"}, "start"),  # YYYY-MM-DD and no other way
        ({"start": "20261130"}, "start"),
        ({"start": "1900-01-01"}, "start"),  # past 366 days before the default end, today
        ({"start": "2025-01-01", "end": "2026-06-01"}, "end"),
        ({"start": "2026-06-02", "end": "2026-06-01"}, "start"),
    ],
)
def test_usage_bad_date_range_is_invalid_request_naming_the_field(client_with_key, query, field):
    response = client_with_key.get("/api/v1/usage", query)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert list(error["fields"]) == [field]
    assert error["message"] == "The query parameters are invalid."


def test_usage_up_to_the_last_day_there_is_answers_empty(client_with_key):
    response = client_with_key.get("/api/v1/usage", {"start": "9999-12-30", "end": "9999-12-31"})

    assert response.status_code == 200, response.content
    assert response.json()["rows"] == []


@pytest.mark.parametrize("end", ["0001-01-01", "0001-01-05", "0001-01-30"])
def test_usage_ending_near_the_first_day_there_is_answers_empty(client_with_key, end):
    """The default start, 30 days before `end`, stops at the first day there is."""
    response = client_with_key.get("/api/v1/usage", {"end": end})

    assert response.status_code == 200, response.content
    assert response.json()["rows"] == []


def test_quota_lists_every_dimension_with_money_as_strings(client_with_key):
    response = client_with_key.get("/api/v1/quota")

    assert response.status_code == 200
    limits = response.json()["limits"]
    assert set(limits) == {
        "requests_per_minute", "requests_per_hour", "requests_per_day", "tokens_per_minute",
        "tokens_per_day", "cost_per_day", "cost_per_month", "concurrency",
    }  # fmt: skip
    for dimension in ("cost_per_day", "cost_per_month"):
        assert isinstance(limits[dimension]["used"], str)
        assert set(limits[dimension]) == {"limit", "used", "remaining", "reset_in"}


def test_quota_global_answers_staff(staff_client):
    response = staff_client.get("/api/v1/quota/global")

    assert response.status_code == 200, response.content
    assert set(response.json()) >= {"global", "providers", "denials_today", "priority_shares"}


def test_cache_stats_body_shape(staff_client):
    response = staff_client.get("/api/v1/cache/stats")

    assert response.status_code == 200
    body = response.json()
    assert set(body["memory"]) >= {"size", "max_size", "hits", "misses"}
    assert set(body["redis"]) >= {"hits", "misses", "hit_rate"}
    assert isinstance(body["popular"], list)


def test_schema_is_openapi_3_and_lists_the_public_paths(api_client, db):
    response = api_client.get("/api/schema/", HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    for path in (
        "/api/v1/generate",
        "/api/v1/topics/subtopics",
        "/api/v1/topics/explanations",
        "/api/v1/quota",
        "/api/v1/usage",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{model}",
    ):
        assert path in schema["paths"], path
    # The body's keys as they are sent, and a key accepted in either header.
    assert "global" in schema["components"]["schemas"]["QuotaGlobalOutput"]["properties"]
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: tg_<prefix>_<secret>`.",
    }
    assert {"apiKeyHeader": []} in schema["paths"]["/api/v1/generate"]["post"]["security"]


def test_schema_is_yaml_unless_json_is_asked_for(client, db):
    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi;")
    assert response.content.startswith(b"openapi: 3.")


def test_docs_serves_swagger_ui(client, db):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert b"swagger" in response.content.lower()


BAD_CREDENTIALS = [
    {"HTTP_AUTHORIZATION": "Bearer tg_abcdefgh_" + "x" * 40},
    {"HTTP_X_API_KEY": "not-a-key"},
    {"HTTP_AUTHORIZATION": "Token nope"},
]


@pytest.mark.usefixtures("redis_conn")  # no earlier test's failures count against this one
@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/api/schema/", "*/*"),
        ("/api/schema/", "application/vnd.oai.openapi"),
        ("/api/schema/", "application/vnd.oai.openapi+json"),
        ("/api/schema/?format=json", "*/*"),
        ("/api/docs/", "*/*"),
        ("/api/docs/", "text/html,application/xhtml+xml,*/*;q=0.8"),
        ("/api/docs/?script", "*/*"),
    ],
)
def test_schema_and_docs_refuse_bad_credentials_as_a_json_error(
    client, db, path, accept, credentials
):
    """The schema and the docs need no key, but a key that is sent must be valid; the 401
    is the contract's JSON whatever the page itself is rendered as (YAML, HTML)."""
    response = client.get(path, HTTP_ACCEPT=accept, **credentials)

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "authentication_failed"
    assert response.json()["error"]["message"]


@pytest.mark.usefixtures("redis_conn")
@pytest.mark.parametrize("credentials", [{}, *BAD_CREDENTIALS])
@pytest.mark.parametrize(
    ("path", "accept"), [("/api/schema/", "text/html"), ("/api/docs/", "application/json")]
)
def test_schema_and_docs_in_a_format_they_do_not_have_is_a_json_406(
    client, db, path, accept, credentials
):
    response = client.get(path, HTTP_ACCEPT=accept, **credentials)

    assert response.status_code == 406
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_acceptable"


@pytest.mark.parametrize("path", ["/api/schema/", "/api/docs/"])
def test_schema_and_docs_wrong_method_is_a_json_405(client, db, path):
    response = client.post(path, {}, content_type="application/json")

    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_metrics_is_prometheus_text(client, db, redis_conn):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"# TYPE " in response.content


def test_readme_lists_every_environment_variable_of_the_contract():
    names = [
        "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL",
        "TOLLGATE_DEFAULT_MODEL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY",
        "GEMINI_BASE_URL", "SENTRY_DSN", "QUOTA_FAIL_MODE", "QUOTA_SAFETY_MARGIN",
        "CACHE_MEMORY_MAX_SIZE", "CACHE_MEMORY_TTL", "CACHE_REDIS_TTL", "METRICS_TOKEN",
        "LOCAL_PROVIDER_LATENCY_MS",
    ]  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in names if f"`{n}`" not in readme and f"| {n} " not in readme]
    assert not missing


# How the code reads a variable: env("X" / env.int("X" ... in the settings, os.environ[...] /
# .get / .setdefault and gunicorn.conf.py's _int("X" anywhere, ${X:-...} in the entry point.
ENV_READS = (
    re.compile(r"""\benv(?:\.[a-z]+)?\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""\bos\.environ(?:\.(?:get|setdefault))?[\[(]\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"""\b_int\(\s*["']([A-Z][A-Z0-9_]*)["']"""),
    re.compile(r"\$\{([A-Z][A-Z0-9_]*):-"),
)
TEST_SUITE_ONLY = {"TOLLGATE_TESTING", "TEST_DATABASE_NAME"}


def _variables_read(path: Path) -> set[str]:
    text = path.read_text()
    return {name for pattern in ENV_READS for name in pattern.findall(text)}


def test_readme_configuration_lists_every_variable_the_code_reads():
    settings_vars = _variables_read(ROOT / "config" / "settings.py")
    gunicorn_vars = _variables_read(ROOT / "gunicorn.conf.py")
    entrypoint_vars = _variables_read(ROOT / "deploy" / "docker-entrypoint.sh")
    # The patterns still match how the files read their variables.
    assert {"SECRET_KEY", "DATABASE_URL", "CELERY_JOBS_PURGE_SECONDS"} <= settings_vars
    assert settings_vars >= TEST_SUITE_ONLY
    assert {"GUNICORN_BIND", "PORT", "WEB_CONCURRENCY"} <= gunicorn_vars
    assert {"DJANGO_MIGRATE_ON_START", "PROMETHEUS_MULTIPROC_DIR"} <= entrypoint_vars
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Configuration\n") :]
    section = section[: section.index("\n## ", 1)]
    # A variable counts as listed when the first column of a row names it.
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", " ".join(first_cells)))

    operator = (settings_vars | gunicorn_vars | entrypoint_vars) - TEST_SUITE_ONLY
    assert sorted(operator - documented) == []
    assert all(f"`{name}`" in section for name in TEST_SUITE_ONLY)


def test_the_suite_empties_no_redis_database_but_its_own():
    # README: `make test` uses the Redis databases of REDIS_URL and CELERY_BROKER_URL (15 and
    # 14 by default) and empties them; the developer's others (`make run` with a .env, a
    # service of their own) are left alone. FLUSHALL empties every database of the server.
    sources = [p for p in ROOT.glob("**/*.py") if ".venv" not in p.relative_to(ROOT).parts]
    command = re.compile(r"""\.flushall\(|["']flushall["']""", re.IGNORECASE)  # redis-py, CLI
    flushing = [str(p.relative_to(ROOT)) for p in sources if command.search(p.read_text())]
    assert flushing == []
    readme = (ROOT / "README.md").read_text()
    assert "`redis://127.0.0.1:6379/15`" in readme
    assert "`redis://127.0.0.1:6379/14`" in readme


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
            "messages",
            '1.role: "wizard" is not a valid choice.',
        ),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ],
)
def test_invalid_request_fields_are_lists_of_strings_even_for_nested_errors(
    client_with_key, body, field, message
):
    response = client_with_key.post("/api/v1/generate", body, format="json")

    assert response.status_code == 400
    fields = response.json()["error"]["fields"]
    assert all(isinstance(m, str) for m in fields[field])
    assert any(message in m for m in fields[field]), fields


def test_explanations_blank_subtopic_is_reported_under_subtopics_with_its_index(client_with_key):
    response = client_with_key.post(
        "/api/v1/topics/explanations", {"topic": "T", "subtopics": ["ok", ""]}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"subtopics": ["1: This field may not be blank."]}


def test_api_key_has_the_documented_shape(user):
    from quotas.services import key_create

    full, key = key_create(user=user, name="shape")

    match = re.fullmatch(r"tg_([a-z0-9]{8})_([A-Za-z0-9_-]{32,})", full)
    assert match, full
    assert match.group(1) == key.prefix


def test_usage_of_another_user_for_staff(staff_client, user):
    response = staff_client.get("/api/v1/usage", {"user": user.username})

    assert response.status_code == 200
    assert response.json()["rows"] == []
    assert response.json()["totals"]["cost_usd"] == "0.000000"


def test_usage_of_an_unknown_user_for_staff_is_invalid_request(staff_client):
    response = staff_client.get("/api/v1/usage", {"user": "ghost"})

    assert response.status_code == 400
    assert "user" in response.json()["error"]["fields"]


def test_quota_with_drf_token_has_no_key(api_client, user, db, redis_conn):
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=user)
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    response = api_client.get("/api/v1/quota")

    assert response.status_code == 200
    assert response.json()["user"] == user.username
    assert response.json()["key"] is None


def test_unknown_api_url_and_wrong_method_answer_in_the_error_shape(client_with_key):
    missing = client_with_key.get("/api/v1/nowhere")
    wrong_method = client_with_key.get("/api/v1/generate")

    assert missing.status_code == 404
    assert missing.json()["error"]["code"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("value", "starts"), [("0.5", True), ("1.5", False), ("-0.1", False)])
def test_quota_safety_margin_outside_zero_to_one_is_refused_at_startup(value, starts):
    env = {**os.environ, "DEBUG": "1", "QUOTA_SAFETY_MARGIN": value}

    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        check=False,
    )

    assert (result.returncode == 0) is starts, result.stderr
    if not starts:
        assert "QUOTA_SAFETY_MARGIN" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("QUOTA_SAFETY_MARGIN", "0.5abc", "must be a number"),  # not 0.5
        ("QUOTA_SAFETY_MARGIN", "nan", "must be a number"),
        ("CACHE_MEMORY_MAX_SIZE", "abc", "must be a whole number"),
        ("CACHE_REDIS_TTL", "-5", "must be at least 1"),
        ("LOCAL_PROVIDER_LATENCY_MS", "-100", "must be at least 0"),
        ("LOCAL_PROVIDER_FAILURE_RATE", "1.5", "must be at most 1"),
        ("DEBUG", "maybe", "must be a yes or a no"),
        ("REDIS_URL", "notaurl", "redis://"),
        ("OPENAI_MAX_TOKENS_PARAM", "max_length", "max_completion_tokens"),
        # A timeout of 0 or less fails every Redis and broker check of the readiness probe.
        ("HEALTH_CHECK_TIMEOUT", "-1", "must be at least 0.001"),
        ("HEALTH_CHECK_TIMEOUT", "0", "must be at least 0.001"),
        # A check the probe does not have would be required in vain, the real one not.
        ("HEALTH_REQUIRED_CHECKS", "database,cache", "cache"),
        ("SENTRY_TRACES_SAMPLE_RATE", "1.5", "must be at most 1"),
        ("SENTRY_TRACES_SAMPLE_RATE", "-0.5", "must be at least 0"),
        ("DATABASE_CONNECT_TIMEOUT", "-3", "must be at least 0"),
        ("CORS_PREFLIGHT_MAX_AGE", "-1", "must be at least 0"),
        ("SECURE_HSTS_SECONDS", "-1", "must be at least 0"),
        ("BUDGET_ALERT_THRESHOLDS", "80,abc", "must be whole numbers"),
        ("BUDGET_ALERT_THRESHOLDS", "0,100", "at least 1"),
        ("LOG_LEVEL", "verbose", "must be a logging level"),
        ("LOG_FORMAT", "text", "json or console"),  # not json without a word
    ],
)
def test_a_setting_that_does_not_parse_or_is_out_of_range_stops_the_start(variable, value, says):
    env = {**os.environ, "DEBUG": "1", variable: value, "DJANGO_SETTINGS_MODULE": "config.settings"}

    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured"), result.stderr
    assert variable in last
    assert says in last


@pytest.mark.parametrize("value", ["debug", "Debug", " DEBUG "])
def test_log_level_is_read_whatever_its_case(value):
    # gunicorn's own GUNICORN_LOG_LEVEL is lowercase ("info"): LOG_LEVEL=debug is natural.
    env = {
        **os.environ,
        "DEBUG": "1",
        "LOG_LEVEL": value,
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    code = (
        "import django, logging; django.setup(); "
        "print(logging.getLevelName(logging.getLogger().level), "
        "logging.getLevelName(logging.getLogger('gunicorn.error').level))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DEBUG", "DEBUG"]


def test_quota_exceeded_on_a_money_dimension_gives_the_limit_as_a_decimal_string(
    api_client, api_key, local_model, redis_conn
):
    full, key = api_key
    UserQuotaFactory(user=key.user, plan=PlanFactory(cost_per_day="0.000001"))
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full}")

    response = _generate(api_client, prompt="x" * 50, cache="bypass")

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["dimension"] == "cost_per_day"
    assert error["scope"] == "plan"
    assert error["limit"] == "0.000001"
    assert error["retry_after"] >= 1
    assert int(response["Retry-After"]) == error["retry_after"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/no-such-endpoint"),
        ("post", "/api/v1/generate/"),  # a trailing slash is another URL
        ("post", "/v1/completions"),
    ],
)
def test_unknown_url_of_a_known_caller_carries_its_rate_limit_headers(
    client_with_key, method, path
):
    response = getattr(client_with_key, method)(path, {}, format="json")

    assert response.status_code == 404
    assert [h for h in RATE_LIMIT_HEADERS if h not in response] == []
    assert response["X-RateLimit-Limit-Requests"] == "60"
    assert response["X-RateLimit-Remaining-Requests"] == "60"  # read, not counted


@pytest.mark.parametrize("path", ["/api/schema/", "/api/docs/"])
def test_schema_and_docs_of_a_known_caller_carry_its_rate_limit_headers(client_with_key, path):
    response = client_with_key.get(path)

    assert response.status_code == 200
    assert [h for h in RATE_LIMIT_HEADERS if h not in response] == []
    assert response["X-RateLimit-Remaining-Requests"] == "60"  # read, not counted


def test_body_over_limit_of_a_known_caller_carries_its_rate_limit_headers(
    client_with_key, settings
):
    settings.API_MAX_BODY_BYTES = 1024

    response = client_with_key.post("/api/v1/generate", {"prompt": "x" * 2000}, format="json")

    assert response.status_code == 413
    assert [h for h in RATE_LIMIT_HEADERS if h not in response] == []
    assert response["X-RateLimit-Remaining-Requests"] == "60"


@pytest.mark.parametrize("credentials", ["Bearer tg_abcdefgh_" + "x" * 40, "Token nope", ""])
def test_unknown_url_without_a_valid_key_is_a_plain_404(api_client, db, credentials):
    if credentials:
        api_client.credentials(HTTP_AUTHORIZATION=credentials)

    response = api_client.post("/api/v1/no-such-endpoint", {}, format="json")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "RateLimit" not in response


@pytest.mark.parametrize("path", ["/api/v1/quota", "/v1/chat/completions"])
def test_a_query_string_of_too_many_fields_is_a_400_not_a_500(client_with_key, path):
    response = client_with_key.get(f"{path}?{'a&' * 1001}")

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_request_error")
