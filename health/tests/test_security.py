from __future__ import annotations

import io

import pytest
from django.http import HttpResponse
from django.test import Client, RequestFactory

from config.middleware import RequestIdMiddleware

pytestmark = pytest.mark.django_db


def test_api_body_over_limit_is_413_in_contract_shape(client, settings):
    settings.API_MAX_BODY_BYTES = 1024
    response = client.post(
        "/api/v1/generate", data='{"prompt": "' + "x" * 2000 + '"}', content_type="application/json"
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "1024" in error["message"]
    assert response["X-Request-ID"]


def test_openai_body_over_limit_is_413_in_openai_shape(client, settings):
    settings.API_MAX_BODY_BYTES = 1024
    response = client.post(
        "/v1/chat/completions", data="{" + " " * 2000 + "}", content_type="application/json"
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # every /v1 error's keys
    assert error["code"] == "payload_too_large"
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["message"]


def test_body_at_limit_reaches_the_view(client, settings):
    settings.API_MAX_BODY_BYTES = 1024
    response = client.post(
        "/api/v1/generate", data="{" + " " * 1022 + "}", content_type="application/json"
    )
    assert response.status_code != 413


def _chunked_request(body: bytes):
    request = RequestFactory().post("/api/v1/generate", data=b"", content_type="application/json")
    request.META.pop("CONTENT_LENGTH", None)
    request.META["HTTP_TRANSFER_ENCODING"] = "chunked"
    request.META["wsgi.input"] = io.BytesIO(body)
    request.META["wsgi.input_terminated"] = True  # as gunicorn says of a de-chunked body
    return request


def test_chunked_body_over_limit_is_413_without_reading_it_all(settings):
    settings.API_MAX_BODY_BYTES = 100
    seen = []
    middleware = RequestIdMiddleware(lambda request: seen.append(request) or HttpResponse("ok"))
    request = _chunked_request(b"y" * 10_000)
    response = middleware(request)
    assert response.status_code == 413
    assert seen == []
    assert request.META["wsgi.input"].tell() == 101  # the limit plus one byte, not the rest


def test_chunked_body_within_limit_is_handed_to_the_view(settings):
    settings.API_MAX_BODY_BYTES = 100
    bodies = []
    middleware = RequestIdMiddleware(lambda request: bodies.append(request.body) or HttpResponse())
    response = middleware(_chunked_request(b'{"prompt": "hi"}'))
    assert response.status_code == 200
    assert bodies == [b'{"prompt": "hi"}']


def test_large_body_outside_api_is_not_refused_by_the_guard(client, settings):
    settings.API_MAX_BODY_BYTES = 10
    response = client.post("/health/live", data="z" * 100, content_type="text/plain")
    assert response.status_code == 405  # the probe is GET and HEAD only; no 413


def test_responses_carry_security_headers_and_csp(client):
    response = client.get("/health/live")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp


def test_hsts_is_sent_over_https_in_production_settings(client, settings):
    assert settings.DEBUG is False
    response = client.get("/health/live", secure=True)
    assert response["Strict-Transport-Security"].startswith("max-age=31536000")
    assert "includeSubDomains" in response["Strict-Transport-Security"]


def test_cors_preflight_allows_configured_origin_only(client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    allowed = client.options(
        "/api/v1/quota",
        HTTP_ORIGIN="https://app.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="x-api-key",
    )
    assert allowed["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "x-api-key" in allowed["Access-Control-Allow-Headers"]
    refused = client.options(
        "/api/v1/quota",
        HTTP_ORIGIN="https://evil.example.net",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
    )
    assert "Access-Control-Allow-Origin" not in refused


def test_metrics_require_the_token_when_set(client, settings):
    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret")
    assert response.status_code == 200
    assert b"tollgate_requests_total" in response.content
    assert b"django_http_requests_before_middlewares_total" in response.content


def test_metrics_refuse_a_non_ascii_token_with_401_not_500(client, settings):
    # hmac.compare_digest raises TypeError for a str that is not ASCII; a header is
    # whatever a client sends (latin-1 in WSGI).
    settings.METRICS_TOKEN = "scrape-secret"
    client.raise_request_exception = False
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secr\u00e9t")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'


def test_metrics_open_when_no_token_is_set(client, settings):
    settings.METRICS_TOKEN = ""
    client.get("/health/live")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert (
        b'tollgate_requests_total{cache="none",endpoint="/health/live",status="200"}'
        in response.content
    )


def test_admin_requires_staff_login(client, django_user_model):
    response = client.get("/admin/dashboard/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    user = django_user_model.objects.create_user("plain", password="pw-123456789")
    client.force_login(user)
    assert client.get("/admin/dashboard/").status_code == 302


def test_production_settings_pass_the_deploy_security_checks():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("TOLLGATE_TESTING", "DEBUG")}
    env.update(
        SECRET_KEY="a-long-random-production-secret-9f8e7d6c5b4a3928171605f4e3d2c1b0",
        DEBUG="0",
        ALLOWED_HOSTS="example.com",
    )
    for name in (
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
    ):
        env.pop(name, None)
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "check",
            "--deploy",
            "--tag",
            "security",
            "--fail-level",
            "WARNING",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_unknown_api_url_is_404_in_contract_shape(client):
    response = client.get("/api/v1/no-such-endpoint")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = client.get("/v1/no-such-endpoint")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert not client.get("/no-such-page")["Content-Type"].startswith("application/json")


def test_disallowed_host_under_api_is_400_in_contract_shape(client):
    response = client.get("/api/v1/quota", HTTP_HOST="evil.example.net")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_request",
        "message": "The request is malformed.",
        "fields": {},
    }


def test_unknown_api_url_is_json_404_even_in_debug(client, settings):
    settings.DEBUG = True
    response = client.get("/api/v1/nothing-here", secure=True)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/api/schema", "/api/docs"])
def test_an_api_page_asked_without_its_trailing_slash_is_redirected_to_it(client, path):
    response = client.get(f"{path}?format=json", secure=True)

    assert response.status_code == 301
    assert response["Location"] == f"{path}/?format=json"


def test_an_unknown_api_url_without_a_trailing_slash_is_still_a_404(client):
    response = client.get("/api/v1/nothing-here", secure=True)  # nor with one

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "shape"),
    [
        ("post", "/api/v1/nothing-here", "api"),
        ("delete", "/api/v1/nothing-here", "api"),
        ("post", "/api/v1/generate/", "api"),  # a trailing slash is another URL
        ("post", "/v1/completions", "openai"),
        ("put", "/v1/chat/completions/", "openai"),
    ],
)
def test_unknown_api_url_is_json_404_whatever_the_method(api_key, method, path, shape):
    # As a client sends it: no CSRF token, and a client that checks CSRF like a browser's.
    client = Client(enforce_csrf_checks=True)

    response = getattr(client, method)(
        path, "{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {api_key[0]}"
    )

    assert response.status_code == 404, response.content
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert ("type" in error) == (shape == "openai")
