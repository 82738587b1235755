"""The provider interface: one call, one answer, typed failures.

A provider turns a `CompletionRequest` into a `Completion` or raises a `ProviderFailure`
subclass. Retries, the circuit breaker and the mapping to HTTP errors live above it
(generation.resilience), so a provider makes exactly one upstream attempt per call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol

from generation.tokens import tokens_count, tokens_count_messages


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One upstream call. `model` is the upstream model name; `task` ("chat", "subtopics",
    "explanation") is a hint only the offline provider uses to shape its answer."""

    model: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    temperature: float | None = None
    task: str = "chat"


@dataclass(frozen=True, slots=True)
class Completion:
    """An answer. Token counts come from the provider's usage report when it gives one
    (`usage_reported`), else from generation.tokens."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    usage_reported: bool = True

    def __post_init__(self) -> None:
        # A count below zero would be settled as a credit to every budget of the caller,
        # and the ledger refuses it: such a usage report makes the answer unusable.
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ProviderServerError(
                f"usage reported as {self.prompt_tokens} prompt and "
                f"{self.completion_tokens} completion tokens"
            )

    @classmethod
    def estimated(cls, request: CompletionRequest, text: str, finish_reason: str) -> Completion:
        """An answer whose provider reported no usage: both counts estimated."""
        return cls(
            text=text,
            prompt_tokens=tokens_count_messages(request.messages),
            completion_tokens=tokens_count(text),
            finish_reason=finish_reason,
            usage_reported=False,
        )


class ProviderFailure(Exception):  # noqa: N818 - a family of failures, not one error
    """An upstream attempt failed. `retryable`: another attempt may succeed;
    `trips_circuit`: the failure says the provider is unhealthy (not our request's fault);
    `retry_after`: seconds the provider asked us to wait, if it said."""

    retryable = True
    trips_circuit = True
    outcome = "upstream_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderTimeout(ProviderFailure):
    outcome = "upstream_timeout"


class ProviderUnreachable(ProviderFailure):
    outcome = "upstream_unavailable"


class ProviderRateLimited(ProviderFailure):
    """429 from the provider: its own quota. Retried after Retry-After; does not trip the
    circuit (the provider is healthy, we are just sending too much)."""

    outcome = "upstream_unavailable"
    trips_circuit = False


class ProviderServerError(ProviderFailure):
    """5xx, or a 200 whose body is unusable (malformed JSON, no choices)."""


class ProviderBrokeOff(ProviderServerError):
    """The provider answered, then its answer broke off (the connection dropped mid-body or
    mid-stream): it was reached, so this is a bad answer, not an unreachable provider."""


class ProviderRejected(ProviderFailure):
    """4xx other than 429: retrying the same request cannot help."""

    retryable = False
    trips_circuit = False


class Provider(Protocol):
    """Anything that can complete a chat."""

    name: str

    def complete(self, request: CompletionRequest, *, timeout: float) -> Completion:
        """One upstream attempt, bounded by `timeout` seconds of reading."""
        ...

    def stream(self, request: CompletionRequest, *, timeout: float) -> Iterator[str | Completion]:
        """One streamed attempt: text pieces as they come, then the whole Completion."""
        ...


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds of a Retry-After header, in either of its forms (RFC 9110): delta-seconds,
    or an HTTP date, read as the seconds from `now` (default: the clock) until it, 0 when
    it has passed. None when there is no header or it cannot be read."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value, now)
    # float() also reads "inf" and "nan", which no wait and no header can be made of.
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until(http_date: str, now: float | None) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": a date in UTC without saying so
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def failure_for_status(
    provider: str, status: int, *, message: str = "", retry_after_header: str | None = None
) -> ProviderFailure:
    """The ProviderFailure of an upstream HTTP error status: 429 rate limited, 408 and 5xx
    server errors (both retried, honouring Retry-After), anything else rejected."""
    retry_after = parse_retry_after(retry_after_header)
    if status == 429:
        return ProviderRateLimited(f"{provider}: rate limited", retry_after=retry_after)
    if status >= 500 or status == 408:
        return ProviderServerError(f"{provider}: HTTP {status}", retry_after=retry_after)
    return ProviderRejected(f"{provider}: HTTP {status}: {message}")
