"""Any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, Groq...).

The official `openai` SDK is the client: it resolves the base URL, the key, the organisation
and project (from its arguments or its environment variables), the headers it sends, and it
streams. A non-streamed completion, the cache miss of every generation endpoint, is one POST
of the same body with the SDK's own URL and headers over a urllib3 connection pool: the SDK's
request building and its httpx2 stack cost 1.7 M instructions per call, a fifth of a cache
miss's (docs/BENCHMARKS.md), for a JSON body this module reads itself anyway. Neither retries:
generation.resilience retries every provider the same way.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
import urllib3

from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderBrokeOff,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnreachable,
    failure_for_status,
)

# The SDK's telemetry headers (its version, the OS, the CPU, the Python runtime), and its
# retry count, which is always 0 here since generation.resilience does the retrying. The
# upstream needs none of them, and each costs header handling on every call: neither the
# SDK's streams nor the POST of `complete` send them.
_UNSENT_HEADERS: dict[str, Any] = dict.fromkeys(
    (
        "X-Stainless-Async",
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-OS",
        "X-Stainless-Arch",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Retry-Count",
        "X-Stainless-Read-Timeout",
    ),
    openai.omit,
)


_OPENAI_HOST = "api.openai.com"

# What reading an answer that is JSON but not of the expected shape raises.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError)


class OpenAIProvider:
    """Chat completions of an OpenAI-compatible endpoint at a configurable base URL: the
    SDK streams, a pooled POST with the SDK's URL and headers completes."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        connect_timeout: float,
        max_tokens_param: str = "",
    ) -> None:
        self.client = openai.OpenAI(
            api_key=api_key or "unset",
            base_url=base_url or None,
            max_retries=0,
            timeout=httpx2.Timeout(60.0, connect=connect_timeout),
            default_headers=_UNSENT_HEADERS,
        )
        self.connect_timeout = connect_timeout
        self.url = f"{self.client.base_url}chat/completions"  # the SDK's base URL ends in /
        headers = {**self.client.default_headers, **self.client.auth_headers}
        self.headers = {k: v for k, v in headers.items() if isinstance(v, str)}
        self.headers["Accept-Encoding"] = "gzip, deflate"
        self.pool = _pool_for(self.url)
        # Without a proxy, the POST goes straight to the upstream host's own connection pool
        # with the request's path: the PoolManager would parse the URL, look the pool up and
        # copy the headers again on every call to arrive at the same pool and path.
        self.endpoint: urllib3.HTTPConnectionPool | None = None
        if not isinstance(self.pool, urllib3.ProxyManager):
            self.endpoint = self.pool.connection_from_url(self.url)
            self.path = urllib3.util.parse_url(self.url).request_uri
        # The field bounding the answer (OPENAI_MAX_TOKENS_PARAM; empty: by the base URL).
        self.max_tokens_param = max_tokens_param or (
            "max_completion_tokens" if self.client.base_url.host == _OPENAI_HOST else "max_tokens"
        )

    def complete(self, request: CompletionRequest, *, timeout: float) -> Completion:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": list(request.messages),
            self.max_tokens_param: request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        options: dict[str, Any] = {
            "body": json.dumps(body).encode(),
            "headers": self.headers,
            "timeout": urllib3.Timeout(connect=self.connect_timeout, read=timeout),
            "retries": False,
            "redirect": False,
            "preload_content": False,  # read below: a body that breaks off is not unreachable
        }
        try:
            if self.endpoint is not None:
                response = self.endpoint.urlopen(
                    "POST", self.path, assert_same_host=False, **options
                )
            else:  # through the proxy, which the PoolManager's request handles
                response = self.pool.request("POST", self.url, **options)
        except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError by class
            raise ProviderUnreachable(f"openai: cannot connect: {exc}") from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise ProviderTimeout(f"openai: timed out after {timeout}s") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ProviderUnreachable(f"openai: cannot connect: {exc}") from exc
        try:
            raw = response.data
        except urllib3.exceptions.TimeoutError as exc:
            raise ProviderTimeout(f"openai: timed out after {timeout}s") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ProviderBrokeOff(f"openai: the answer broke off: {exc}") from exc
        finally:
            response.release_conn()
        if response.status >= 300:
            raise failure_for_status(
                "openai",
                response.status,
                message=_error_message(raw),
                retry_after_header=response.headers.get("retry-after"),
            )
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ProviderServerError(f"openai: malformed response: {exc}") from exc
        return _completion(data, request)

    def stream(self, request: CompletionRequest, *, timeout: float) -> Iterator[str | Completion]:
        kwargs: dict[str, Any] = {self.max_tokens_param: request.max_tokens}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        parts: list[str] = []
        finish = "stop"
        usage = None
        with _mapped_errors(timeout):
            chunks = self.client.chat.completions.create(  # type: ignore[call-overload]
                model=request.model,
                messages=list(request.messages),
                stream=True,
                stream_options={"include_usage": True},
                timeout=httpx2.Timeout(timeout, connect=self.connect_timeout),
                extra_headers=_UNSENT_HEADERS,
                **kwargs,
            )
        # Closed even when our caller stops reading (the client left). The provider has
        # answered: a connection it drops from here on breaks its answer off.
        received = False
        with chunks, _mapped_errors(timeout, answered=True):
            for chunk in chunks:
                received = True
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    finish = choice.finish_reason
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                    yield choice.delta.content
        if not received:
            # Not one chunk (an empty body, or [DONE] alone): no answer, not an empty one,
            # which would be charged and cached.
            raise ProviderServerError("openai: the stream ended without a chunk")
        yield _streamed_completion(usage, request, "".join(parts), finish)


def _pool_for(url: str) -> urllib3.PoolManager:
    """Keep-alive connections to the upstream, through the proxy the environment names for
    it (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as the SDK's httpx2 client would. It keeps as
    many idle connections as the SDK does (each opened only when concurrent calls need it),
    so that no thread of a worker or of the explanations pool has one thrown away."""
    size = openai.DEFAULT_CONNECTION_LIMITS.max_keepalive_connections or 100
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, maxsize=size)
    return urllib3.PoolManager(maxsize=size)


def _error_message(body: bytes) -> str:
    """The upstream's own words for a refusal: `error.message` of an OpenAI error body, else
    the start of the body."""
    try:
        data = json.loads(body)
        message = data["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
    return str(message)


@contextmanager
def _mapped_errors(timeout: float, *, answered: bool = False) -> Iterator[None]:
    """SDK and transport errors as ProviderFailure subclasses; a connection error once the
    provider has `answered` is its answer broken off."""
    try:
        yield
    except openai.APITimeoutError as exc:
        raise ProviderTimeout(f"openai: timed out after {timeout}s") from exc
    except openai.APIConnectionError as exc:
        if answered:
            raise ProviderBrokeOff(f"openai: the answer broke off: {exc}") from exc
        raise ProviderUnreachable(f"openai: cannot connect: {exc}") from exc
    except openai.APIStatusError as exc:
        raise failure_for_status(
            "openai",
            exc.status_code,
            message=exc.message,
            retry_after_header=exc.response.headers.get("retry-after"),
        ) from exc
    except (openai.APIError, httpx2.HTTPError, ValueError) as exc:
        raise ProviderServerError(f"openai: malformed or broken response: {exc}") from exc
    except _SHAPE_ERRORS as exc:
        if not answered:
            raise  # nothing was read yet: a mistake of ours, not the provider's
        # The SDK builds its chunks without validating them: an event that is JSON but
        # not a chunk (a number, a "choices" that is no list) fails as we read it.
        raise ProviderServerError(f"openai: answer of unexpected shape: {exc!r}") from exc


def _streamed_completion(
    usage: Any, request: CompletionRequest, text: str, finish: str
) -> Completion:
    """A stream's Completion from its usage chunk, read as `_completion` reads a body's:
    a report without the prompt's count is none (estimated), a missing completion count
    is 0. The SDK builds the chunk without validating it, so a count may be anything:
    ProviderServerError when it is not a number."""
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    if prompt_tokens is None:
        return Completion.estimated(request, text, finish)
    try:
        completion_tokens = int(getattr(usage, "completion_tokens", None) or 0)
        return Completion(text, int(prompt_tokens), completion_tokens, finish)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProviderServerError(f"openai: unexpected usage report: {exc!r}") from exc


def _completion(data: Any, request: CompletionRequest) -> Completion:
    """A Completion from a chat.completion body; ProviderServerError when it is not one."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        finish = choice.get("finish_reason") or "stop"
        usage = data.get("usage")
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            return Completion(
                text=str(text),
                prompt_tokens=int(usage["prompt_tokens"]),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=str(finish),
            )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        # OverflowError: a count of 1e400, which JSON reads as infinity
        raise ProviderServerError(f"openai: unexpected response shape: {exc!r}") from exc
    return Completion.estimated(request, str(text), str(finish))
