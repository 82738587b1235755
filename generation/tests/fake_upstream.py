"""A fake LLM provider: a real HTTP server on loopback speaking the OpenAI chat-completions
and the Gemini generateContent wire formats, told how to answer by the test.

Behaviours (`Behaviour.kind`): "ok", "slow" (answers after `delay` seconds), "status" (an
error status, optionally with Retry-After), "malformed" (200 with a body that is not JSON),
"hang" (never answers until the server stops), "held" (answers as "ok" once the test sets
the behaviour's `gate`, or gives up when the server stops), "cut" (an answer, streamed or not, that
breaks off half-way: the connection drops before the declared length), "paced" (a stream
whose first piece of text comes at once, or its first `at_once` events, each further event
`delay` seconds after the previous one), "raw" (200 with `body` as it is: JSON, or the
events of a stream, of a shape the test chooses).
Streaming requests (OpenAI `stream: true`, Gemini `streamGenerateContent?alt=sse`) are
answered as server-sent events, a few words per event. A test scripts the next answers with
`script(...)` (consumed in order), sets a `default`, or adds `rules` that apply to requests
whose prompt contains a given text. Every request is recorded in `requests`.

Also runnable as a process for the benchmarks: `python -m generation.tests.fake_upstream PORT
[DELAY]` (every answer DELAY seconds late).
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_GEMINI_PATH = re.compile(
    r"^/v1(beta)?/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$"
)


@dataclass
class Behaviour:
    kind: str = "ok"
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    text: str | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion); None: counted by length
    body: str | None = None  # the whole answer of a "raw" behaviour
    # The finish reason in the provider's own words ("length", "MAX_TOKENS", "SAFETY"...);
    # None: a natural stop.
    finish: str | None = None
    usage_reported: bool = True  # False: the answer carries no usage report at all
    thoughts: int = 0  # Gemini: thinking tokens (thoughtsTokenCount), billed as output
    # Gemini: the prompt itself is blocked (promptFeedback.blockReason): no candidates.
    blocked: str | None = None
    gate: threading.Event = field(default_factory=threading.Event)  # opens a "held" answer
    at_once: int | None = None  # "paced": events sent at once (None: to the first text)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class FakeUpstream:
    default: Behaviour = field(default_factory=Behaviour)
    queue: list[Behaviour] = field(default_factory=list)
    rules: list[tuple[str, Behaviour]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def script(self, *behaviours: Behaviour) -> None:
        with self.lock:
            self.queue.extend(behaviours)

    def rule(self, contains: str, behaviour: Behaviour) -> None:
        with self.lock:
            self.rules.append((contains, behaviour))

    def reset(self) -> None:
        with self.lock:
            self.default = Behaviour()
            self.queue.clear()
            self.rules.clear()
            self.requests.clear()

    def _choose(self, prompt: str) -> Behaviour:
        with self.lock:
            for contains, behaviour in self.rules:
                if contains in prompt:
                    return behaviour
            if self.queue:
                return self.queue.pop(0)
            return self.default

    def start(self, port: int = 0) -> FakeUpstream:
        self.server = _Server(("127.0.0.1", port), _handler_for(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the benchmark opens many connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (wrk at the end of a run, a worker that stops) is not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _answer_text(prompt: str) -> str:
    if "JSON" in prompt and "subtopics" in prompt:
        topic = (
            prompt.rsplit("Topic:", 1)[-1].strip().splitlines()[0] if "Topic:" in prompt else "it"
        )
        items = [f"{topic} part {i}" for i in range(1, 13)]
        return json.dumps({"subtopics": items})
    return f"Answer about: {prompt[-60:]}"


def _handler_for(fake: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes: without this, Nagle's algorithm
            # and delayed ACKs add 40 ms to every answer.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(
            self,
            status: int,
            body: bytes,
            headers: dict[str, str] | None = None,
            *,
            cut: bool = False,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if cut:
                self._cut(body)
                return
            self.wfile.write(body)

        def _cut(self, data: bytes) -> None:
            """Half of `data`, then the connection drops before the declared length."""
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _opened(self, behaviour: Behaviour) -> bool:
            """Wait for a "held" answer's gate (True) or the server's stop (False)."""
            if behaviour.kind == "hang":
                fake.stop.wait(60)
                return False
            while not behaviour.gate.wait(0.05):
                if fake.stop.is_set():
                    return False
            return True

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            gemini = _GEMINI_PATH.match(self.path.split("?", 1)[0])
            if self.path.split("?", 1)[0].endswith("/chat/completions"):
                prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                flavour = "openai"
            elif gemini:
                parts = [
                    p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", [])
                ]
                system = body.get("systemInstruction") or body.get("system_instruction") or {}
                parts = [p.get("text", "") for p in system.get("parts", [])] + parts
                prompt = "\n".join(parts)
                flavour = "gemini"
            else:
                self._send(
                    404, json.dumps({"error": {"message": f"not found: {self.path}"}}).encode()
                )
                return
            with fake.lock:
                fake.requests.append(
                    Recorded(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        time.monotonic(),
                    )
                )
            behaviour = fake._choose(prompt)
            if gemini and not body.get("contents"):
                # As Gemini: a request holds at least one content (a system instruction
                # alone is refused).
                behaviour = Behaviour(kind="status", status=400)
            if behaviour.kind in ("hang", "held") and not self._opened(behaviour):
                return
            if behaviour.kind == "slow" and behaviour.delay:
                time.sleep(behaviour.delay)
            if behaviour.kind == "status":
                headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
                self._send(behaviour.status, _error(flavour, behaviour.status), headers)
                return
            if behaviour.kind in ("malformed", "raw"):
                answer, kind = b'{"choices": [ this is not json', "application/json"
                if behaviour.kind == "raw":
                    answer = (behaviour.body or "").encode()
                    if body.get("stream") or "alt=sse" in self.path:
                        kind = "text/event-stream"
                self._send(200, answer, content_type=kind)
                return
            text = behaviour.text if behaviour.text is not None else _answer_text(prompt)
            p_tokens, c_tokens = behaviour.usage or (_words(prompt), _words(text))
            if flavour == "openai" and body.get("stream"):
                usage = (body.get("stream_options") or {}).get("include_usage")
                events = _openai_events(
                    body.get("model", "?"), text, p_tokens, c_tokens, usage, behaviour=behaviour
                )
                pace = behaviour.delay if behaviour.kind == "paced" else 0.0
                # The role's event, then the first piece of text at once.
                at_once = behaviour.at_once or 2
                self._send_events(events, cut=behaviour.kind == "cut", pace=pace, at_once=at_once)
                return
            if gemini and gemini.group("method") == "streamGenerateContent":
                events = _gemini_events(gemini.group("model"), text, p_tokens, c_tokens, behaviour)
                pace = behaviour.delay if behaviour.kind == "paced" else 0.0
                at_once = behaviour.at_once or 1
                self._send_events(events, cut=behaviour.kind == "cut", pace=pace, at_once=at_once)
                return
            if flavour == "openai":
                payload = _openai_body(body.get("model", "?"), text, p_tokens, c_tokens, behaviour)
            else:
                assert gemini is not None
                payload = _gemini_body(gemini.group("model"), text, p_tokens, c_tokens, behaviour)
            self._send(200, json.dumps(payload).encode(), cut=behaviour.kind == "cut")

        def _send_events(
            self, events: list[str], *, cut: bool, pace: float = 0.0, at_once: int = 1
        ) -> None:
            data = "".join(f"data: {event}\n\n" for event in events).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if pace:  # the first `at_once` events together, then one `pace` seconds apart
                for index, event in enumerate(events):
                    self.wfile.write(f"data: {event}\n\n".encode())
                    self.wfile.flush()
                    if index + 1 >= at_once:
                        time.sleep(pace)
                return
            if cut:
                self._cut(data)  # half the events
                return
            self.wfile.write(data)

    return Handler


def _error(flavour: str, status: int) -> bytes:
    if flavour == "openai":
        kind = "rate_limit_error" if status == 429 else "server_error"
        return json.dumps(
            {"error": {"message": f"fake {status}", "type": kind, "param": None, "code": None}}
        ).encode()
    names = {
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
        400: "INVALID_ARGUMENT",
    }
    return json.dumps(
        {
            "error": {
                "code": status,
                "message": f"fake {status}",
                "status": names.get(status, "UNKNOWN"),
            }
        }
    ).encode()


def _openai_usage(p_tokens: int, c_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": p_tokens,
        "completion_tokens": c_tokens,
        "total_tokens": p_tokens + c_tokens,
    }


def _openai_body(
    model: str, text: str, p_tokens: int, c_tokens: int, behaviour: Behaviour
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": behaviour.finish or "stop",
            }
        ],
    }
    if behaviour.usage_reported:
        body["usage"] = _openai_usage(p_tokens, c_tokens)
    return body


def _pieces(text: str, size: int = 3) -> list[str]:
    words = text.split(" ")
    return [
        " ".join(words[i : i + size]) + (" " if i + size < len(words) else "")
        for i in range(0, len(words), size)
    ]


def _openai_events(
    model: str,
    text: str,
    p_tokens: int,
    c_tokens: int,
    include_usage: bool,
    *,
    behaviour: Behaviour,
) -> list[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    events += [
        chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        for piece in _pieces(text)
    ]
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": behaviour.finish or "stop"}]))
    if include_usage and behaviour.usage_reported:
        events.append(chunk([], usage=_openai_usage(p_tokens, c_tokens)))
    events.append("[DONE]")
    return events


def _gemini_usage(p_tokens: int, c_tokens: int, behaviour: Behaviour) -> dict[str, int]:
    usage = {
        "promptTokenCount": p_tokens,
        "candidatesTokenCount": c_tokens,
        "totalTokenCount": p_tokens + c_tokens + behaviour.thoughts,
    }
    if behaviour.thoughts:
        usage["thoughtsTokenCount"] = behaviour.thoughts
    return usage


def _gemini_blocked(model: str, p_tokens: int, behaviour: Behaviour) -> dict[str, Any]:
    """Gemini's answer to a prompt it blocks: no candidates, the reason in promptFeedback."""
    return {
        "promptFeedback": {"blockReason": behaviour.blocked},
        "usageMetadata": {"promptTokenCount": p_tokens, "totalTokenCount": p_tokens},
        "modelVersion": model,
    }


def _gemini_events(
    model: str, text: str, p_tokens: int, c_tokens: int, behaviour: Behaviour
) -> list[str]:
    if behaviour.blocked:
        return [json.dumps(_gemini_blocked(model, p_tokens, behaviour))]
    pieces = _pieces(text)
    events = []
    for index, piece in enumerate(pieces):
        body: dict[str, Any] = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}],
            "modelVersion": model,
        }
        if index == len(pieces) - 1:
            body["candidates"][0]["finishReason"] = behaviour.finish or "STOP"
            if behaviour.usage_reported:
                body["usageMetadata"] = _gemini_usage(p_tokens, c_tokens, behaviour)
        events.append(json.dumps(body))
    return events


def _gemini_body(
    model: str, text: str, p_tokens: int, c_tokens: int, behaviour: Behaviour
) -> dict[str, Any]:
    if behaviour.blocked:
        return _gemini_blocked(model, p_tokens, behaviour)
    body: dict[str, Any] = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": behaviour.finish or "STOP",
                "index": 0,
            }
        ],
        "modelVersion": model,
    }
    if behaviour.usage_reported:
        body["usageMetadata"] = _gemini_usage(p_tokens, c_tokens, behaviour)
    return body


if __name__ == "__main__":
    # PORT [DELAY]: every answer after DELAY seconds (a provider's own time), default none.
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    default = Behaviour("slow", delay=delay) if delay else Behaviour()
    server = FakeUpstream(default=default).start(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    threading.Event().wait()
