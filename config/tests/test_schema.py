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


def test_schema_is_valid_openapi_without_a_single_warning(tmp_path):
    """Every field's type resolved, no two operations with one id: what clients generate
    from the document is what the API does."""
    from django.core.management import call_command

    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml")
    )

    assert (tmp_path / "schema.yml").read_text().startswith("openapi: 3.")
