"""The message middleware builds its storage only for requests that use messages."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_api_requests_never_build_the_message_storage(client, monkeypatch):
    import config.middleware

    def refuse(request):
        raise AssertionError("the message storage was built")

    monkeypatch.setattr(config.middleware, "default_storage", refuse)

    response = client.get("/health/live")

    assert response.status_code == 200
    assert "messages" not in response.cookies


def test_admin_messages_still_reach_the_next_page(admin_client):
    from quotas.models import Plan

    added = admin_client.post(
        "/admin/quotas/plan/add/", {"name": "message-check", "priority": "medium"}, follow=True
    )

    assert added.status_code == 200
    assert Plan.objects.filter(name="message-check").exists()
    assert "was added successfully" in added.content.decode()
