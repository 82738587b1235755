"""Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, Groq...) through the official
`openai` SDK. The SDK's own retries are off: generation.resilience retries every provider
the same way."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnreachable,
    parse_retry_after,
)
from generation.tokens import tokens_count, tokens_count_messages


class OpenAIProvider:
    """Chat completions over the openai SDK with a configurable base URL."""

    name = "openai"

    def __init__(self, *, api_key: str, base_url: str | None, connect_timeout: float) -> None:
        self.client = openai.OpenAI(
            api_key=api_key or "unset",
            base_url=base_url or None,
            max_retries=0,
            timeout=httpx2.Timeout(60.0, connect=connect_timeout),
        )
        self.connect_timeout = connect_timeout

    def complete(self, request: CompletionRequest, *, timeout: float) -> Completion:
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        try:
            response = self.client.chat.completions.create(
                model=request.model,
                messages=list(request.messages),  # type: ignore[arg-type]
                timeout=httpx2.Timeout(timeout, connect=self.connect_timeout),
                **kwargs,
            )
        except openai.APITimeoutError as exc:
            raise ProviderTimeout(f"openai: timed out after {timeout}s") from exc
        except openai.APIConnectionError as exc:
            raise ProviderUnreachable(f"openai: cannot connect: {exc}") from exc
        except openai.APIStatusError as exc:
            retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
            if exc.status_code == 429:
                raise ProviderRateLimited("openai: rate limited", retry_after=retry_after) from exc
            if exc.status_code >= 500 or exc.status_code == 408:
                raise ProviderServerError(
                    f"openai: HTTP {exc.status_code}", retry_after=retry_after
                ) from exc
            raise ProviderRejected(f"openai: HTTP {exc.status_code}: {exc.message}") from exc
        except (ValueError, openai.APIResponseValidationError) as exc:
            raise ProviderServerError(f"openai: malformed response: {exc}") from exc
        if not response.choices:
            raise ProviderServerError("openai: response without choices")
        choice = response.choices[0]
        text = choice.message.content or ""
        usage = response.usage
        if usage is not None:
            return Completion(
                text=text,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                finish_reason=choice.finish_reason or "stop",
            )
        return Completion(
            text=text,
            prompt_tokens=tokens_count_messages(request.messages),
            completion_tokens=tokens_count(text),
            finish_reason=choice.finish_reason or "stop",
            usage_reported=False,
        )
