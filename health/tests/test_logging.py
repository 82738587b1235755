from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from django.http import HttpResponse
from django.utils.log import log_response

from config.logging import logging_config

pytestmark = pytest.mark.django_db


@pytest.fixture
def log_lines():
    """The JSON lines the configured formatter writes, captured from the root logger."""
    spec = dict(logging_config(level="INFO", fmt="json")["formatters"]["structured"])
    factory = spec.pop("()")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(factory(**spec))
    root = logging.getLogger()
    root.addHandler(handler)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    lines.raw = stream.getvalue  # type: ignore[attr-defined]
    yield lines
    root.removeHandler(handler)


def test_request_log_line_carries_request_id_user_and_key_prefix_but_no_key(
    api_client, api_key, redis_conn, log_lines
):
    full_key, key = api_key
    response = api_client.get(
        "/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {full_key}", HTTP_X_REQUEST_ID="req-log-1"
    )
    assert response.status_code == 200
    assert response["X-Request-ID"] == "req-log-1"
    lines = log_lines()
    request_lines = [line for line in lines if line.get("event") == "request"]
    assert len(request_lines) == 1
    line = request_lines[0]
    assert line["request_id"] == "req-log-1"
    assert line["user"] == str(key.user_id)
    assert line["key_prefix"] == f"tg_{key.prefix}"
    assert line["endpoint"] == "/api/v1/quota"
    assert line["status"] == 200
    assert line["method"] == "GET"
    assert line["cache"] == "none"
    assert line["quota"] == "none"
    assert line["latency_ms"] >= 0
    assert line["level"] == "info"
    # tg_<prefix>_<secret>: the secret (URL-safe base64) may hold underscores itself.
    secret = full_key.split("_", 2)[2]
    assert len(secret) > 20
    assert secret not in log_lines.raw()


def test_request_log_line_of_unknown_key_holds_no_key(api_client, redis_conn, log_lines):
    bogus = "tg_abcd1234_" + "s" * 40
    response = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {bogus}")
    assert response.status_code == 401
    assert "s" * 40 not in log_lines.raw()
    (line,) = [line for line in log_lines() if line.get("event") == "request"]
    assert line["status"] == 401
    assert "key_prefix" not in line
    assert line["request_id"] == response["X-Request-ID"]


def test_log_lines_redact_keys_tokens_and_prompts_logged_by_mistake(log_lines, settings):
    settings.LOG_SENSITIVE_DATA = False
    full_key = "tg_zz99yy88_" + "Q" * 43
    logging.getLogger("tollgate.test").warning("calling upstream with %s", full_key)
    structlog.get_logger("tollgate.test").info(
        "generation", prompt="my secret plan", authorization="Token " + "a" * 40, model="m"
    )
    raw = log_lines.raw()
    assert "Q" * 43 not in raw
    assert "my secret plan" not in raw
    assert "a" * 40 not in raw
    first, second = log_lines()
    assert "tg_zz99yy88_[redacted]" in first["event"]
    assert second["prompt"] == "[redacted]"
    assert second["model"] == "m"


def test_log_lines_keep_sensitive_data_when_debug_setting_says_so(log_lines, settings):
    settings.LOG_SENSITIVE_DATA = True
    structlog.get_logger("tollgate.test").info("generation", prompt="visible prompt")
    assert log_lines()[0]["prompt"] == "visible prompt"


def test_log_lines_inside_a_request_carry_its_request_id(client, log_lines):
    from config.middleware import request_id_var

    token = request_id_var.set("req-inner")
    try:
        logging.getLogger("tollgate.test").info("inside")
    finally:
        request_id_var.reset(token)
    assert log_lines()[0]["request_id"] == "req-inner"


@pytest.mark.usefixtures("redis_conn", "local_model")
def test_request_log_lines_report_cache_result_and_quota_decision(api_client, log_lines):
    from quotas.services import key_create
    from quotas.tests.factories import PlanFactory, UserFactory, UserQuotaFactory

    plan = PlanFactory(requests_per_minute=2)
    user = UserQuotaFactory(user=UserFactory(), plan=plan).user
    full_key, _ = key_create(user=user, name="log")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
    prompts = ["what is a log line"] * 3 + ["something never asked"]
    statuses = [
        api_client.post(
            "/api/v1/generate", {"prompt": p, "max_tokens": 8}, format="json"
        ).status_code
        for p in prompts
    ]
    # Miss, hit, then over the limit: a stale copy of the same answer, then a refusal.
    assert statuses == [200, 200, 200, 429]
    lines = [line for line in log_lines() if line.get("event") == "request"]
    assert [(line["cache"], line["quota"]) for line in lines] == [
        ("MISS", "admitted"),
        ("HIT", "admitted"),
        ("STALE", "fallback"),
        ("none", "denied:plan.requests_per_minute"),
    ]
    assert all(line["endpoint"] == "/api/v1/generate" for line in lines)
    assert "what is a log line" not in log_lines.raw()
    assert "something never asked" not in log_lines.raw()


def test_log_lines_written_by_a_celery_task_carry_its_id(log_lines):
    from config.celery import app

    @app.task(name="health.tests.log_something")
    def log_something():
        logging.getLogger("tollgate.test").info("from a task")

    result = log_something.apply(task_id="task-123")
    assert result.successful()
    (line,) = [line for line in log_lines() if line.get("event") == "from a task"]
    assert line["task_id"] == "task-123"
    assert line["task"] == "health.tests.log_something"
    logging.getLogger("tollgate.test").info("after the task")
    assert "task_id" not in log_lines()[-1]


def test_http_client_loggers_are_quiet_at_info_and_speak_at_debug():
    quiet = logging_config(level="INFO")["loggers"]
    loud = logging_config(level="DEBUG")["loggers"]

    assert quiet["httpx2"]["level"] == quiet["google_genai"]["level"] == "WARNING"
    assert loud["httpx2"]["level"] == loud["google_genai"]["level"] == "DEBUG"


def test_a_refused_request_is_logged_once_by_the_request_line(api_client, log_lines, capfd):
    response = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION="Bearer tg_bad_key")
    logging.getLogger("django.server").warning('"GET /api/v1/quota HTTP/1.1" 401 73')

    assert response.status_code == 401
    lines = log_lines()
    assert [line["event"] for line in lines] == ["request"]
    assert lines[0]["status"] == 401
    assert capfd.readouterr().err == ""  # no plain-text copy either


def test_a_server_error_is_still_logged_with_its_traceback(log_lines):
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("django.request").error("Internal Server Error: /x", exc_info=True)

    [line] = log_lines()
    assert line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_answered_upstream_or_service_failure_is_logged_once_by_the_request_line(
    log_lines, rf, status
):
    # What Django's handler does with every response of 400 or more.
    log_response(
        "%s: %s",
        "Service Unavailable",
        "/api/v1/generate",
        response=HttpResponse(status=status),
        request=rf.post("/api/v1/generate"),
    )

    assert log_lines() == []


def test_a_500_response_is_still_logged_by_django(log_lines, rf):
    log_response(
        "%s: %s",
        "Internal Server Error",
        "/x",
        response=HttpResponse(status=500),
        request=rf.get("/x"),
    )

    [line] = log_lines()
    assert line["level"] == "error"
    assert line["event"] == "Internal Server Error: /x"
