"""Generation endpoints: parse, call generation.services, render."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from config.errors import ApiError, InvalidRequest, error_path
from config.errors import exception_handler as api_exception_handler
from generation import services
from generation.serializers import (
    ChatCompletionInputSerializer,
    ExplanationsInputSerializer,
    ExplanationsOutputSerializer,
    GenerateInputSerializer,
    GenerateOutputSerializer,
    SubtopicsInputSerializer,
    SubtopicsOutputSerializer,
)
from quotas import services as quota_services
from quotas.authentication import KeyPrincipal
from quotas.models import ModelPrice
from quotas.permissions import KeyScopePermission
from quotas.views import RateLimitHeadersMixin, principal_of

MAX_IDEMPOTENCY_KEY = 255
RATE_LIMIT_HEADER_PREFIXES = ("RateLimit", "X-RateLimit-")
IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="A retry with the same key within 24 h returns the first answer, charged once.",
)


def _user_id(request: Request) -> int:
    pk = request.user.pk
    assert pk is not None  # noqa: S101 - IsAuthenticated let the request in
    return int(pk)


def _request_id(request: Request) -> str:
    """The request's id as its client sees it: X-Request-ID, the log lines' request_id and
    the `request_id` of its bodies (set by config.middleware.RequestIdMiddleware)."""
    return str(getattr(request, "request_id", None) or "")


def _caller(request: Request, priority: str = "high") -> services.Caller:
    auth = request.auth
    key_id = auth.id if isinstance(auth, KeyPrincipal) else None
    request_id = _request_id(request) or uuid.uuid4().hex
    if request.headers.get("X-Request-ID") == request_id:
        # The client chose this id, and may send it again (a retry, a proxy that copies
        # it): the ledger needs an id of its own per request, or a reused one would lose
        # the second request's row. The client's id stays its prefix, for searching; the
        # responses and log lines carry the client's id as it sent it.
        request_id = f"{request_id[:40]}.{uuid.uuid4().hex[:12]}"
    return services.Caller(
        user_id=_user_id(request), key_id=key_id, request_id=request_id, priority=priority
    )


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, None without one; a 400 when it is too long."""
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            "Idempotency-Key is too long.",
            fields={"Idempotency-Key": [f"At most {MAX_IDEMPOTENCY_KEY} characters."]},
        )
    return key


def _answer_headers(
    response: Response | StreamingHttpResponse, headers: dict[str, str], *, replayed: bool
) -> None:
    for name, value in headers.items():
        # A replay's rate-limit headers are the caller's standing now (RateLimitHeadersMixin
        # reads it), not the first answer's: requests made since count, and a reset is
        # counted from now.
        if not (replayed and name.startswith(RATE_LIMIT_HEADER_PREFIXES)):
            response[name] = value
    if replayed:
        response["Idempotent-Replayed"] = "true"


def idempotent_response(
    request: Request,
    view_name: str,
    run: Callable[[], services.Replay],
    upstream_calls: int = 1,
) -> Response:
    """The answer of `run`, once per Idempotency-Key of the caller: a retry with the key
    replays the first answer (charged once); the key in flight or with another body is a 409."""
    key = _idempotency_key(request)
    answer, replayed = services.idempotent_run(
        user_id=_user_id(request),
        key=key,
        # Only a request with a key is ever compared with another.
        fingerprint=services.request_fingerprint(view_name, request.data) if key else "",
        run=run,
        upstream_calls=upstream_calls,
    )
    response = Response(answer.body, status=answer.status)
    _answer_headers(response, answer.headers, replayed=replayed)
    return response


def _replay(body: Any, outcome_headers: dict[str, str], cache: str) -> services.Replay:
    return services.Replay(status=200, body=body, headers={**outcome_headers, "X-Cache": cache})


class _AnswerView(RateLimitHeadersMixin, APIView):
    """A POST answered by the generation services: the body checked by `input_serializer`,
    then `answer` run once per Idempotency-Key (`fingerprint_scope` keeps one endpoint's
    key from replaying another's answer)."""

    permission_classes = (IsAuthenticated, KeyScopePermission)
    key_scope = "generate"
    input_serializer: type[Serializer[Any]]
    fingerprint_scope: str

    def post(self, request: Request) -> Response:
        params = self.input_serializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        caller = _caller(request, data["priority"])
        return idempotent_response(
            request,
            self.fingerprint_scope,
            lambda: self.answer(caller, data),
            upstream_calls=self.upstream_calls(caller, data),
        )

    def answer(self, caller: services.Caller, data: dict[str, Any]) -> services.Replay:
        raise NotImplementedError

    def upstream_calls(self, caller: services.Caller, data: dict[str, Any]) -> int:
        """How many upstream calls `answer` may make one after another."""
        return 1


def _documented(request: type[Serializer[Any]], response: type[Serializer[Any]]) -> Any:
    return extend_schema_view(
        post=extend_schema(
            request=request, responses={200: response}, parameters=[IDEMPOTENCY_HEADER]
        )
    )


@_documented(GenerateInputSerializer, GenerateOutputSerializer)
class GenerationCreateView(_AnswerView):
    input_serializer = GenerateInputSerializer
    fingerprint_scope = "generate"

    def answer(self, caller: services.Caller, data: dict[str, Any]) -> services.Replay:
        outcome = services.completion_create(
            caller=caller,
            model=data.get("model"),
            messages=data["messages"],
            max_tokens=data.get("max_tokens"),
            temperature=data.get("temperature"),
            cache_policy=data["cache"],
            prompt_field=data["prompt_field"],
        )
        body = services.completion_body(
            outcome, request_id=_request_id(self.request) or caller.request_id
        )
        return _replay(body, outcome.headers, outcome.cache)


@_documented(SubtopicsInputSerializer, SubtopicsOutputSerializer)
class TopicSubtopicsView(_AnswerView):
    input_serializer = SubtopicsInputSerializer
    fingerprint_scope = "subtopics"

    def answer(self, caller: services.Caller, data: dict[str, Any]) -> services.Replay:
        outcome = services.topic_subtopics(
            caller=caller, topic=data["topic"], count=data["count"], model=data.get("model")
        )
        body = services.subtopics_body(outcome, topic=data["topic"])
        return _replay(body, outcome.headers, outcome.cache)

    def upstream_calls(self, caller: services.Caller, data: dict[str, Any]) -> int:
        return services.SUBTOPICS_UPSTREAM_CALLS


@_documented(ExplanationsInputSerializer, ExplanationsOutputSerializer)
class TopicExplanationsView(_AnswerView):
    input_serializer = ExplanationsInputSerializer
    fingerprint_scope = "explanations"

    def answer(self, caller: services.Caller, data: dict[str, Any]) -> services.Replay:
        items = services.topic_explanations(
            caller=caller,
            topic=data["topic"],
            subtopics=data["subtopics"],
            model=data.get("model"),
        )
        every = {i.outcome.cache for i in items if i.outcome}
        cache = every.pop() if len(every) == 1 else "MISS"
        return _replay(
            services.explanations_body(items), services.explanations_headers(items), cache
        )

    def upstream_calls(self, caller: services.Caller, data: dict[str, Any]) -> int:
        return services.explanations_rounds(
            len(data["subtopics"]), caller=caller, model=data.get("model")
        )


# --- OpenAI-compatible ----------------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """Errors of /v1/ in OpenAI's shape {"error": {"message", "type", "param", "code"}},
    with the same status codes and headers as the rest of the API."""
    # The path of a nested error (`messages.[1].content`), read off DRF's detail before the
    # contract's `fields` flatten it.
    path = error_path(exc.detail) if isinstance(exc, ValidationError) else ()
    response = api_exception_handler(exc, context)
    error = (response.data or {}).get("error", {})
    fields = error.get("fields") or {}
    message = error.get("message", "")
    if fields and message == "The request body is invalid.":
        # OpenAI's shape has no room for every field: name the first problem.
        name = next(iter(fields))
        message = f"{message} {name}: {_first_message(fields[name])}"
    body = {
        "message": message,
        "type": _OPENAI_TYPES.get(
            response.status_code, "server_error" if response.status_code >= 500 else "api_error"
        ),
        "param": _openai_param(path) if path else next(iter(fields), None),
        "code": error.get("code"),
    }
    if "request_id" in error:  # a server-side failure: the id to quote, as under /api/
        body["request_id"] = error["request_id"]
    response.data = {"error": body}
    return response


def _openai_param(path: tuple[str, ...]) -> str:
    """A field's path in OpenAI's notation: ("messages", "1", "content") is
    `messages.[1].content`."""
    return ".".join(f"[{step}]" if step.isdigit() else step for step in path)


def _first_message(messages: list[str]) -> str:
    return str(messages[0]) if messages else ""


def _model_body(price: ModelPrice) -> dict[str, Any]:
    # OpenAI's Model object; the catalogue keeps no creation date.
    return {"id": price.model, "object": "model", "created": 0, "owned_by": price.provider}


class _ModelsView(RateLimitHeadersMixin, APIView):
    """OpenAI's model listing: the enabled models of the catalogue this caller may use
    (its plan's allowed models and its key's model scopes), so that a client configured
    with Tollgate's base URL can discover them."""

    permission_classes = (IsAuthenticated, KeyScopePermission)
    key_scope = "generate"

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        return openai_exception_handler

    def allowed(self, request: Request) -> list[ModelPrice]:
        user_id, key_id = principal_of(request)
        return quota_services.models_allowed(user_id=user_id, key_id=key_id)


class ModelListView(_ModelsView):
    @extend_schema(
        responses={200: OpenApiTypes.OBJECT},
        summary="The models you may use",
        operation_id="v1_models_list",
    )
    def get(self, request: Request) -> Response:
        return Response(
            {"object": "list", "data": [_model_body(price) for price in self.allowed(request)]}
        )


class ModelDetailView(_ModelsView):
    @extend_schema(
        responses={200: OpenApiTypes.OBJECT},
        summary="One model you may use",
        operation_id="v1_models_retrieve",
    )
    def get(self, request: Request, model: str) -> Response:
        for price in self.allowed(request):
            if price.model == model:
                return Response(_model_body(price))
        raise ApiError(
            f"The model {model!r} does not exist or you do not have access to it.",
            code="model_not_found",
            status=404,
        )


def _chat_body(outcome: services.Outcome, completion_id: str, created: int) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": outcome.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.value.get("text", "")},
                "logprobs": None,
                "finish_reason": outcome.value.get("finish_reason", "stop"),
            }
        ],
        "usage": outcome.usage(),
        "system_fingerprint": None,
    }


def _chat_stream(
    outcome: services.Outcome,
    completion_id: str,
    created: int,
    include_usage: bool,
    request_id: str,
    *,
    ended: Callable[[services.Outcome], None] | None = None,
) -> Generator[bytes, None, None]:
    """The events of a streamed answer. `ended` is called once its last piece is sent and
    the answer settled (or refunded: `outcome.error`), before the events that tell the
    client it ended: a client that has read them and retries finds what `ended` did."""
    # Asked for usage, every chunk carries the field, null until the last one (OpenAI's).
    no_usage = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": outcome.model,
            "choices": choices,
            **no_usage,
            **extra,
        }
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    yield chunk(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    )
    for piece in outcome.pieces if outcome.pieces is not None else _pieces(outcome.value):
        yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    if ended is not None:
        ended(outcome)
    if outcome.error is not None:
        # Cut short upstream (and refunded): OpenAI SDKs raise on an event carrying "error".
        error = {
            "message": outcome.error.message,
            "type": "server_error",
            "code": outcome.error.code,
            "request_id": request_id,
        }
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
        yield b"data: [DONE]\n\n"
        return
    finish = outcome.value.get("finish_reason", "stop")
    yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
    if include_usage:
        yield chunk([], usage=outcome.usage())
    yield b"data: [DONE]\n\n"


class _StreamBody:
    """A stream's response body: its events, then, when the server closes the response
    (it always does, whether the client read to the end or went away, even before the
    first event), the outcome's close, which settles a stream cut short, and the release
    of its Idempotency-Key's `claim` if its answer was not kept (the client left)."""

    def __init__(
        self,
        events: Generator[bytes, None, None],
        outcome: services.Outcome,
        claim: services.IdempotencyClaim | None = None,
    ) -> None:
        self.events = events
        self.outcome = outcome
        self.claim = claim

    def __iter__(self) -> Iterator[bytes]:
        return self.events

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            try:
                if self.outcome.close is not None:
                    self.outcome.close()
            finally:
                if self.claim is not None:  # released after the settlement: a retry finds
                    self.claim.finish(None)  # the lease of the stream it repeats freed


def _event_stream(events: Iterable[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # nginx (the compose proxy, ingress-nginx) passes each event on as it comes
    # instead of buffering the stream, whatever its proxy_buffering.
    response["X-Accel-Buffering"] = "no"
    return response


def _stored_stream(
    body: dict[str, Any], include_usage: bool, request_id: str
) -> Generator[bytes, None, None]:
    """The events of a stored chat.completion body (an Idempotency-Key's first answer),
    as its stream sent them: the same id, text in pieces, finish reason and usage."""
    choice = body["choices"][0]
    usage = body["usage"]
    outcome = services.Outcome(
        value={"text": choice["message"]["content"], "finish_reason": choice["finish_reason"]},
        model=body["model"],
        cache="MISS",  # not sent: the stored X-Cache header is
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
    )
    return _chat_stream(outcome, body["id"], body["created"], include_usage, request_id)


def _pieces(value: dict[str, Any]) -> Iterator[str]:
    """A whole (cached) answer cut in pieces of a few words, as a stream would bring it."""
    words = str(value.get("text", "")).split(" ")
    for start in range(0, len(words), 8):
        tail = " " if start + 8 < len(words) else ""
        yield " ".join(words[start : start + 8]) + tail


class ChatCompletionCreateView(RateLimitHeadersMixin, APIView):
    permission_classes = (IsAuthenticated, KeyScopePermission)
    key_scope = "generate"

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        return openai_exception_handler

    @extend_schema(
        request=ChatCompletionInputSerializer,
        responses={200: OpenApiTypes.OBJECT},
        description="OpenAI Chat Completions (also `stream: true`, as server-sent events).",
        parameters=[IDEMPOTENCY_HEADER],
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        params = ChatCompletionInputSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        caller = _caller(request, data["priority"])
        # max_completion_tokens is OpenAI's newer name for max_tokens (never both).
        max_tokens_field = (
            "max_completion_tokens" if data.get("max_completion_tokens") else "max_tokens"
        )
        max_tokens = data.get(max_tokens_field)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def run(
            *, stream: bool = False, keep_alive: Callable[[], object] | None = None
        ) -> services.Outcome:
            return services.completion_create(
                caller=caller,
                model=data["model"],
                messages=[dict(m) for m in data["messages"]],
                max_tokens=max_tokens,
                temperature=data.get("temperature"),
                stream=stream,
                max_tokens_field=max_tokens_field,
                keep_alive=keep_alive,
            )

        def replay(outcome: services.Outcome) -> services.Replay:
            return _replay(
                _chat_body(outcome, completion_id, created), outcome.headers, outcome.cache
            )

        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            return self.stream(
                request,
                run=run,
                replay=replay,
                completion_id=completion_id,
                created=created,
                include_usage=include_usage,
            )
        return idempotent_response(request, "chat.completions", lambda: replay(run()))

    def stream(
        self,
        request: Request,
        *,
        run: Callable[..., services.Outcome],
        replay: Callable[[services.Outcome], services.Replay],
        completion_id: str,
        created: int,
        include_usage: bool,
    ) -> StreamingHttpResponse:
        """A streamed answer. Errors before the first piece are ordinary JSON errors; the
        stream is settled when it ends.

        With an Idempotency-Key (the same fingerprint as a whole answer's, `stream` part of
        it: a stream and a whole answer are two requests), the key is claimed before the
        admission and kept claimed while the stream runs (renewed with its lease). A stream
        that ends with its answer settled keeps it, as a whole answer's, and a retry gets
        it again as a stream, not charged. One that fails, or that its client leaves (which
        pays for what it was sent), releases the key: its retry runs, and is charged, again."""
        key = _idempotency_key(request)
        request_id = _request_id(request)
        claim: services.IdempotencyClaim | None = None
        if key:
            fingerprint = services.request_fingerprint("chat.completions", request.data)
            user_id = _user_id(request)
            stored = services.idempotency_begin(
                user_id=user_id, key=key, fingerprint=fingerprint, stream=True
            )
            if stored is not None:
                response = _event_stream(_stored_stream(stored.body, include_usage, request_id))
                _answer_headers(response, stored.headers, replayed=True)
                return response
            claim = services.IdempotencyClaim(user_id=user_id, key=key, fingerprint=fingerprint)
        try:
            outcome = run(stream=True, keep_alive=claim.renew if claim is not None else None)
        except BaseException:
            if claim is not None:
                claim.finish(None)
            raise

        def ended(outcome: services.Outcome) -> None:
            if claim is not None:
                claim.finish(replay(outcome) if outcome.error is None else None)

        body = _StreamBody(
            _chat_stream(outcome, completion_id, created, include_usage, request_id, ended=ended),
            outcome,
            claim,
        )
        response = _event_stream(body)
        _answer_headers(response, {**outcome.headers, "X-Cache": outcome.cache}, replayed=False)
        return response
