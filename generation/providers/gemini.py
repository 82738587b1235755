"""Google Gemini through the official `google-genai` SDK, with a configurable base URL.
The SDK's own retries stay off (its default): generation.resilience retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderBrokeOff,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnreachable,
    failure_for_status,
)

# Gemini's finish reasons in OpenAI's words. Every stop of Gemini's filters (safety,
# recitation, blocklists, prohibited content, personal data) is a `content_filter`: the
# answer was withheld or cut, and a client reading "stop" would take it for a whole one.
# Anything else (OTHER, LANGUAGE...) is a stop, OpenAI having no word for it.
_FILTERED = (
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "MODEL_ARMOR",
)
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", **dict.fromkeys(_FILTERED, "content_filter")}

# Whether the call in progress (in this thread) has had its response's headers: the SDK
# reads the body itself, and a connection dropped after them breaks an answer off (502)
# where one dropped before is an unreachable provider (503). Set by the HTTP client's
# response hook, which runs in the calling thread as the headers arrive.
_answered: ContextVar[bool] = ContextVar("gemini_answered", default=False)


def _headers_received(response: httpx2.Response) -> None:
    _answered.set(True)


class GeminiProvider:
    """generateContent over google-genai."""

    name = "gemini"

    def __init__(self, *, api_key: str, base_url: str | None) -> None:
        self.client = genai.Client(
            api_key=api_key or "unset",
            http_options=types.HttpOptions(
                base_url=base_url or None,
                client_args={"event_hooks": {"response": [_headers_received]}},
            ),
        )

    def _arguments(
        self, request: CompletionRequest, timeout: float
    ) -> tuple[list[types.Content], types.GenerateContentConfig]:
        system = "\n".join(m["content"] for m in request.messages if m.get("role") == "system")
        contents = [
            types.Content(
                role="model" if m.get("role") == "assistant" else "user",
                parts=[types.Part(text=m.get("content", ""))],
            )
            for m in request.messages
            if m.get("role") != "system"
        ]
        if not contents:
            # Instructions alone (OpenAI answers them): Gemini refuses a request without
            # contents, so they are its one user turn.
            contents = [types.Content(role="user", parts=[types.Part(text=system)])]
            system = ""
        config = types.GenerateContentConfig(
            max_output_tokens=request.max_tokens,
            temperature=request.temperature,
            system_instruction=system or None,
            # google-genai takes one timeout, in milliseconds, per request.
            http_options=types.HttpOptions(timeout=max(1, int(timeout * 1000))),
        )
        return contents, config

    def complete(self, request: CompletionRequest, *, timeout: float) -> Completion:
        contents, config = self._arguments(request, timeout)
        with _mapped_errors(timeout):
            response = self.client.models.generate_content(
                model=request.model, contents=contents, config=config
            )
        if not response.candidates:
            if _prompt_blocked(response):
                return _with_usage(request, "", "content_filter", response.usage_metadata)
            raise ProviderServerError("gemini: response without candidates")
        text, finish = _candidate(response)
        return _with_usage(request, text, finish, response.usage_metadata)

    def stream(self, request: CompletionRequest, *, timeout: float) -> Iterator[str | Completion]:
        contents, config = self._arguments(request, timeout)
        parts: list[str] = []
        finish = "stop"
        usage = None
        answered = False  # a candidate came, or the prompt was blocked
        with _mapped_errors(timeout):
            for response in self.client.models.generate_content_stream(
                model=request.model, contents=contents, config=config
            ):
                if response.usage_metadata is not None:
                    usage = response.usage_metadata
                if not response.candidates:
                    if _prompt_blocked(response):
                        answered, finish = True, "content_filter"
                    continue
                answered = True
                text, finish = _candidate(response)
                if text:
                    parts.append(text)
                    yield text
        if not answered:
            # Not one candidate (an empty body, or usage alone), as `complete` takes it: no
            # answer, not an empty one, which would be charged and cached.
            raise ProviderServerError("gemini: the stream ended without a candidate")
        yield _with_usage(request, "".join(parts), finish, usage)


def _prompt_blocked(response: types.GenerateContentResponse) -> bool:
    """Gemini's filters blocked the prompt itself: it answers without any candidate, the
    reason in promptFeedback. That is an answer (the same prompt is blocked again, and the
    provider is healthy), not a failure to retry or to hold against the circuit."""
    feedback = response.prompt_feedback
    return feedback is not None and feedback.block_reason is not None


def _candidate(response: types.GenerateContentResponse) -> tuple[str, str]:
    candidate = (response.candidates or [])[0]
    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
    text = "".join(p.text or "" for p in parts)
    reason = getattr(candidate.finish_reason, "value", None) or "STOP"
    return text, _FINISH.get(str(reason), "stop")


def _with_usage(
    request: CompletionRequest,
    text: str,
    finish: str,
    usage: types.GenerateContentResponseUsageMetadata | None,
) -> Completion:
    if usage is not None and usage.prompt_token_count is not None:
        # A thinking model's thoughts are counted apart from the answer's tokens but billed
        # as output, as OpenAI counts reasoning tokens in completion_tokens.
        return Completion(
            text=text,
            prompt_tokens=usage.prompt_token_count,
            completion_tokens=(usage.candidates_token_count or 0)
            + (usage.thoughts_token_count or 0),
            finish_reason=finish,
        )
    return Completion.estimated(request, text, finish)


@contextmanager
def _mapped_errors(timeout: float) -> Iterator[None]:
    """SDK and transport errors as ProviderFailure subclasses; a connection lost once the
    provider has begun its answer breaks that answer off."""
    _answered.set(False)
    try:
        yield
    except httpx2.TimeoutException as exc:
        raise ProviderTimeout(f"gemini: timed out after {timeout}s") from exc
    except httpx2.TransportError as exc:
        if _answered.get():
            raise ProviderBrokeOff(f"gemini: the answer broke off: {exc}") from exc
        raise ProviderUnreachable(f"gemini: cannot connect: {exc}") from exc
    except genai_errors.APIError as exc:
        headers = getattr(exc.response, "headers", None) or {}
        raise failure_for_status(
            "gemini",
            exc.code,
            message=str(exc.message),
            retry_after_header=headers.get("retry-after"),
        ) from exc
    except (ValueError, httpx2.HTTPError) as exc:
        raise ProviderServerError(f"gemini: malformed or broken response: {exc}") from exc
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        if not _answered.get():
            raise  # no response yet: a mistake of ours, not the provider's
        # google-genai walks the JSON before validating it: a body that is no object, or
        # a field of another type than its enum's, fails inside the SDK as we read it.
        raise ProviderServerError(f"gemini: answer of unexpected shape: {exc!r}") from exc
