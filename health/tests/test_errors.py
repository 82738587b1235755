from __future__ import annotations

import ast
import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentry_sdk

from config.logging import sentry_init

pytestmark = [pytest.mark.django_db, pytest.mark.urls("health.tests.urls_raising")]


@pytest.fixture
def raising_client(client):
    client.raise_request_exception = False
    return client


def test_unexpected_error_in_api_view_is_500_with_request_id_and_no_traceback(raising_client):
    response = raising_client.get("/api/v1/test-boom", HTTP_X_REQUEST_ID="req-500-a")
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal_error",
            "message": "An unexpected error occurred.",
            "request_id": "req-500-a",
        }
    }
    assert b"internal detail" not in response.content
    assert b"Traceback" not in response.content


def test_unexpected_error_in_plain_api_view_is_500_in_contract_shape(raising_client):
    response = raising_client.get("/api/v1/test-boom-plain", HTTP_X_REQUEST_ID="req-500-b")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["request_id"] == "req-500-b"
    assert b"internal detail" not in response.content


def test_unexpected_error_under_v1_is_500_in_openai_shape(raising_client):
    response = raising_client.get("/v1/test-boom-plain", HTTP_X_REQUEST_ID="req-500-c")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["request_id"] == "req-500-c"
    assert error["message"]


def test_unexpected_error_outside_the_api_keeps_djangos_page(raising_client):
    response = raising_client.get("/admin-boom")
    assert response.status_code == 500
    assert not response["Content-Type"].startswith("application/json")
    assert b"internal detail" not in response.content


class _Ingest(BaseHTTPRequestHandler):
    envelopes: list[bytes] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.envelopes.append(body)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def sentry_ingest():
    """A Sentry ingest endpoint on loopback that keeps the envelopes it receives."""
    _Ingest.envelopes = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ingest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sentry_init(
        dsn=f"http://public@127.0.0.1:{server.server_port}/42",
        environment="test",
        release="test-release",
        traces_rate=0.0,
    )
    yield _Ingest.envelopes
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: reporting off again
    server.shutdown()


def _events(envelopes: list[bytes]) -> list[dict]:
    events = []
    for envelope in envelopes:
        lines = envelope.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                events.append(json.loads(payload))
    return events


def test_unexpected_error_reaches_sentry_tagged_with_request_id(raising_client, sentry_ingest):
    full_key = "tg_abcd1234_" + "K" * 43
    response = raising_client.post(
        "/api/v1/test-boom",
        data={"prompt": "a confidential prompt"},
        content_type="application/json",
        HTTP_X_REQUEST_ID="req-sentry-1",
        HTTP_X_API_KEY=full_key,
        HTTP_AUTHORIZATION=f"Bearer {full_key}",
    )
    assert response.status_code == 500
    sentry_sdk.flush(timeout=5)
    raw = b"".join(sentry_ingest)
    assert b"K" * 43 not in raw
    assert b"a confidential prompt" not in raw
    events = _events(sentry_ingest)
    assert events, "no event reached the Sentry endpoint"
    tagged = [e for e in events if e.get("tags", {}).get("request_id") == "req-sentry-1"]
    assert tagged
    event = tagged[0]
    assert event["environment"] == "test"
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"


def test_sentry_event_carries_no_key_or_prompt_held_in_a_frames_local_variables(
    raising_client, sentry_ingest
):
    # Sentry sends every frame's local variables by default and scrubs only a few names
    # (`api_key`, `secret`...): `credential` or `body` would go out as they are.
    full_key = "tg_abcd1234_" + "L" * 43
    response = raising_client.post(
        "/api/v1/test-boom-locals",
        data={"prompt": "another confidential prompt"},
        content_type="application/json",
        HTTP_X_REQUEST_ID="req-sentry-2",
        HTTP_X_API_KEY=full_key,
    )
    assert response.status_code == 500
    sentry_sdk.flush(timeout=5)
    raw = b"".join(sentry_ingest)
    events = _events(sentry_ingest)
    assert [e for e in events if e.get("tags", {}).get("request_id") == "req-sentry-2"]
    assert b"L" * 43 not in raw
    assert b"another confidential prompt" not in raw


def test_sentry_instruments_django_celery_and_logging_and_loads_no_provider_sdk():
    """With a DSN, a worker starts with Sentry's Django, Celery and logging integrations
    only: the auto-enabled ones would import both provider SDKs into every worker (about
    50 MiB), wrap each Redis command and upstream call, and add tracing headers to the
    requests sent to model providers. Without tracing, no span per middleware either."""
    script = (
        "import sys, django, sentry_sdk\n"
        "django.setup()\n"
        "print(sorted(sentry_sdk.get_client().integrations))\n"
        "print(sorted(m for m in ('openai', 'google.genai') if m in sys.modules))\n"
        "from sentry_sdk.integrations.django import DjangoIntegration\n"
        "django_ = sentry_sdk.get_client().get_integration(DjangoIntegration)\n"
        "from sentry_sdk.tracing_utils import has_tracing_enabled\n"
        "client = sentry_sdk.get_client()\n"
        "tracing = has_tracing_enabled(client.options)\n"
        "print(django_.middleware_spans, django_.signals_spans, tracing)\n"
    )
    env = {
        **os.environ,
        "SENTRY_DSN": "http://public@127.0.0.1:9/1",
        "SENTRY_TRACES_SAMPLE_RATE": "0",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()

    integrations = ast.literal_eval(out[0])
    assert {"django", "celery", "logging"} <= set(integrations)
    assert not {"openai", "google_genai", "redis", "httpx", "httpx2"} & set(integrations)
    assert out[1] == "[]"  # neither SDK imported by starting the application
    # A sample rate of 0 (the default): tracing off, no span around each middleware and
    # receiver, no tracing headers on outgoing requests.
    assert out[2] == "False False False"
