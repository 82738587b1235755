from __future__ import annotations

import pytest
from csp.decorators import csp_update
from csp.utils import build_policy
from django.http import HttpResponse

from config.middleware import CSPMiddleware

pytestmark = pytest.mark.django_db


def test_csp_plain_responses_get_the_settings_policy_every_time(client):
    first = client.get("/health/live")
    second = client.get("/health/live")

    assert first["Content-Security-Policy"] == build_policy()
    assert second["Content-Security-Policy"] == first["Content-Security-Policy"]
    assert "Content-Security-Policy-Report-Only" not in second


def test_csp_view_that_updates_the_policy_still_gets_its_own(client, rf):
    client.get("/health/live")  # the settings' policy is built and kept
    view = csp_update({"img-src": ["https://img.example"]})(lambda request: HttpResponse())

    response = CSPMiddleware(view)(rf.get("/somewhere"))

    assert "img-src 'self' data: https://img.example" in response["Content-Security-Policy"]
    assert "https://img.example" not in client.get("/health/live")["Content-Security-Policy"]


def test_csp_policy_follows_a_change_of_the_settings(client, settings):
    client.get("/health/live")
    settings.CONTENT_SECURITY_POLICY = {"DIRECTIVES": {"default-src": ["'none'"]}}
    settings.CONTENT_SECURITY_POLICY_REPORT_ONLY = {
        "DIRECTIVES": {"default-src": ["'self'"]},
        "EXCLUDE_URL_PREFIXES": ["/health/ready"],
    }

    response = client.get("/health/live")

    assert response["Content-Security-Policy"] == "default-src 'none'"
    assert response["Content-Security-Policy-Report-Only"] == "default-src 'self'"
    assert "Content-Security-Policy-Report-Only" not in client.get("/health/ready")
