"""The OpenAPI document describes endpoints, not the mixins they are built from."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_schema_descriptions_are_never_a_base_class_docstring(api_client):
    from caching.http import ConditionalGetMixin
    from quotas.views import RateLimitHeadersMixin

    response = api_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    document = response.content.decode()
    for base in (ConditionalGetMixin, RateLimitHeadersMixin):
        first_line = (base.__doc__ or "").strip().splitlines()[0]
        assert first_line
        assert first_line not in document
    schema = response.json()
    assert schema["paths"]["/v1/chat/completions"]["post"]["description"].startswith("OpenAI")
