"""The offline `local` provider: a deterministic generator for `make run`, demos and
benchmarks. Same input, same answer; tokens counted with generation.tokens. It can
simulate upstream latency (LOCAL_PROVIDER_LATENCY_MS) and failures
(LOCAL_PROVIDER_FAILURE_RATE: that fraction of calls raise a server error,
LOCAL_PROVIDER_TIMEOUT_RATE: that fraction time out)."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator

from django.conf import settings

from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderServerError,
    ProviderTimeout,
)
from generation.tokens import tokens_count, tokens_count_messages

_ASPECTS = (
    "fundamentals",
    "history",
    "core concepts",
    "tools and ecosystem",
    "best practices",
    "common pitfalls",
    "advanced techniques",
    "real-world applications",
    "performance",
    "testing",
    "security",
    "future directions",
)
_SENTENCES = (
    "{s} is a central part of {t}.",
    "Understanding {s} helps explain how {t} works in practice.",
    "Practitioners of {t} usually meet {s} early and return to it often.",
    "A good way to learn {s} is to start with small, concrete examples.",
    "Most mistakes with {s} come from skipping its basic assumptions.",
)


def _capitalised(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _field(prompt: str, name: str) -> str:
    for line in prompt.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


class LocalProvider:
    """Deterministic offline answers; labelled `local/...` by the catalogue."""

    name = "local"

    def complete(self, request: CompletionRequest, *, timeout: float) -> Completion:
        latency = settings.LOCAL_PROVIDER_LATENCY_MS / 1000
        roll = random.random()
        if roll < settings.LOCAL_PROVIDER_TIMEOUT_RATE:
            time.sleep(min(timeout, latency or timeout))
            raise ProviderTimeout("local provider: simulated timeout")
        if roll < settings.LOCAL_PROVIDER_TIMEOUT_RATE + settings.LOCAL_PROVIDER_FAILURE_RATE:
            raise ProviderServerError("local provider: simulated failure")
        if latency:
            time.sleep(latency)
        prompt = "\n".join(m.get("content", "") for m in request.messages)
        text = self._answer(request, prompt)
        completion_tokens = tokens_count(text)
        finish = "stop"
        if completion_tokens > request.max_tokens:
            kept: list[str] = []
            used = 0
            for word in text.split(" "):
                cost = tokens_count((" " if kept else "") + word)
                if used + cost > request.max_tokens:
                    break
                kept.append(word)
                used += cost
            text = " ".join(kept)
            completion_tokens = tokens_count(text)
            finish = "length"
        return Completion(
            text=text,
            prompt_tokens=tokens_count_messages(request.messages),
            completion_tokens=completion_tokens,
            finish_reason=finish,
            usage_reported=False,
        )

    def stream(self, request: CompletionRequest, *, timeout: float) -> Iterator[str | Completion]:
        completion = self.complete(request, timeout=timeout)
        words = completion.text.split(" ")
        for start in range(0, len(words), 4):
            tail = " " if start + 4 < len(words) else ""
            yield " ".join(words[start : start + 4]) + tail
        yield completion

    def _answer(self, request: CompletionRequest, prompt: str) -> str:
        digest = hashlib.sha256(f"{request.model}\x00{prompt}".encode()).digest()
        if request.task == "subtopics":
            topic = _field(prompt, "Topic") or "the topic"
            count = int(_field(prompt, "Count") or 6)
            start = digest[0] % len(_ASPECTS)
            names = [_ASPECTS[(start + i) % len(_ASPECTS)] for i in range(count)]
            return json.dumps({"subtopics": [f"{topic}: {n}" for n in names]})
        if request.task == "explanation":
            topic = _field(prompt, "Topic") or "the topic"
            subtopic = _field(prompt, "Subtopic") or topic
            first = digest[0]
            picks = [_SENTENCES[(first + i) % len(_SENTENCES)] for i in range(3)]
            return " ".join(_capitalised(p.format(s=subtopic, t=topic)) for p in picks)
        last = request.messages[-1].get("content", "") if request.messages else ""
        words = last.split()
        subject = " ".join(words[:12]) or "your message"
        picks = [_SENTENCES[(digest[0] + i) % len(_SENTENCES)] for i in range(2)]
        body = " ".join(_capitalised(p.format(s="this question", t="the subject")) for p in picks)
        return f"[local offline model] You asked about: {subject}. {body}"
