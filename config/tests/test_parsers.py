"""Bodies that parse badly are a 400 in the contract's shape, never a 500."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture
def key_client(api_client, api_key, local_model):
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    return api_client


@pytest.mark.parametrize("depth", [100_000, 900])
def test_generate_deeply_nested_body_is_400(key_client, depth):
    body = '{"prompt": ' + "[" * depth + "]" * depth + "}"

    response = key_client.post("/api/v1/generate", body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_request"


def test_chat_completions_deeply_nested_body_is_400_in_openai_shape(key_client):
    body = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"

    response = key_client.post("/v1/chat/completions", body, content_type="application/json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "nested too deeply" in error["message"]


def test_generate_deeply_nested_body_with_idempotency_key_is_400(key_client):
    body = '{"prompt": "x", "extra": ' + "[" * 900 + "]" * 900 + "}"

    response = key_client.post(
        "/api/v1/generate", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="deep"
    )

    assert response.status_code in (200, 400), response.content


def test_chat_completions_invalid_field_message_names_the_problem(key_client):
    image_only = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]

    response = key_client.post(
        "/v1/chat/completions", {"model": "local/demo", "messages": image_only}, format="json"
    )

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == "messages.[0].content"
    assert error["message"].startswith("The request body is invalid. messages: ")
    assert len(error["message"]) > len("The request body is invalid. messages: ")


@pytest.mark.parametrize(
    "content", ['"\\ud800 alone"', '[{"type": "text", "text": "x \\udfff"}]', '[{"type": "text"}]']
)
def test_chat_completions_content_that_is_no_text_is_400_in_openai_shape(key_client, content):
    # JSON may escape a lone surrogate, which no text contains and UTF-8 cannot encode.
    body = '{"model": "local/demo", "messages": [{"role": "user", "content": ' + content + "}]}"

    response = key_client.post("/v1/chat/completions", body, content_type="application/json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages.[0].content"


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "\\ud800"}',
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"prompt": "a", "messages": []}',
        '{"messages": []}',
    ],
)
def test_generate_body_that_is_no_prompt_is_400_with_its_field(key_client, body):
    response = key_client.post("/api/v1/generate", body, content_type="application/json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert set(error["fields"]) & {"prompt", "messages"}
