"""Request bodies of the generation endpoints (bounded sizes; a bad body is a 400)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.validators import ProhibitSurrogateCharactersValidator

from config.serializers import InputSerializer, StrictBooleanField, StrictFloatField, TextField

MAX_PROMPT_CHARS = 100_000
MAX_MESSAGES = 200
PRIORITIES = ("critical", "high", "medium", "low")


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=("system", "user", "assistant"))
    content = TextField(max_length=MAX_PROMPT_CHARS, trim_whitespace=False)


class GenerateInputSerializer(InputSerializer):
    prompt = TextField(max_length=MAX_PROMPT_CHARS, required=False, trim_whitespace=False)
    messages = serializers.ListField(
        child=MessageSerializer(), required=False, max_length=MAX_MESSAGES
    )
    model = TextField(max_length=100, required=False)
    max_tokens = serializers.IntegerField(min_value=1, max_value=1_000_000, required=False)
    temperature = StrictFloatField(min_value=0.0, max_value=2.0, required=False)
    priority = serializers.ChoiceField(choices=PRIORITIES, default="high")
    cache = serializers.ChoiceField(choices=("use", "refresh", "bypass"), default="use")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A prompt becomes one user message; `prompt_field` keeps which field the client
        sent, for the errors that concern the prompt (too long for the model)."""
        has_prompt, has_messages = "prompt" in attrs, "messages" in attrs
        if has_prompt == has_messages:
            raise serializers.ValidationError(
                {"prompt": ["Give exactly one of prompt and messages."]}
            )
        if has_messages and not attrs["messages"]:
            raise serializers.ValidationError({"messages": ["No messages."]})
        if has_prompt:
            if not attrs["prompt"].strip():
                raise serializers.ValidationError({"prompt": ["The prompt is empty."]})
            attrs["messages"] = [{"role": "user", "content": attrs.pop("prompt")}]
            attrs["prompt_field"] = "prompt"
        else:
            attrs["messages"] = [dict(m) for m in attrs["messages"]]
            attrs["prompt_field"] = "messages"
        return attrs


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                    "required": ["type", "text"],
                },
            },
        ],
        "nullable": True,
    }
)
class ChatContentField(serializers.Field):
    """OpenAI message content: a string, or a list of parts of which the text ones count."""

    default_validators = [ProhibitSurrogateCharactersValidator()]

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, str):
            text = data
        elif isinstance(data, list):
            texts = []
            for index, part in enumerate(data):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    # An image, audio or file would be dropped: the answer would be another.
                    named = f"of type {kind[:40]}" if isinstance(kind, str) else "without a type"
                    raise serializers.ValidationError(
                        f"Content part {index} is {named}: only text parts are supported "
                        "by this gateway."
                    )
                if not isinstance(part.get("text"), str):
                    raise serializers.ValidationError(
                        f"Content part {index}: a text part's text must be a string."
                    )
                texts.append(part["text"])
            text = "".join(texts)
        elif data is None:
            text = ""
        else:
            raise serializers.ValidationError("Expected a string or a list of content parts.")
        if len(text) > MAX_PROMPT_CHARS:
            raise serializers.ValidationError(f"At most {MAX_PROMPT_CHARS} characters.")
        return text

    def to_representation(self, value: Any) -> Any:
        return value


class ChatMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=("system", "developer", "user", "assistant"))
    content = ChatContentField()
    # The participant's name (multi-agent conversations name each speaker): carried to an
    # OpenAI-compatible upstream, and part of the cache key since it changes the answer.
    name = TextField(max_length=64, required=False)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("role") in ("tool", "function"):
                raise serializers.ValidationError(
                    {
                        "role": f"The {data['role']} role is not supported by this gateway "
                        "(it carries no tool calls)."
                    }
                )
            for name in ("tool_calls", "function_call"):
                if data.get(name):
                    raise serializers.ValidationError({name: "Not supported by this gateway."})
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["role"] == "developer":  # OpenAI's newer name for the system role
            attrs["role"] = "system"
        return attrs


# OpenAI chat-completions fields that change the answer and that Tollgate does not carry to
# a provider: refused unless their value is the one that changes nothing, since answering
# without them would be another answer (and cached as the answer to the request with them).
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "stop": (None, []),
    "seed": (None,),
    "top_p": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "moderation": (None,),
}
# Accepted and ignored: they do not change the answer (the prompt_cache_* ones steer
# OpenAI's own prompt cache, which no answer depends on).
_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
    }
)


def _neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    """`value` is one of `neutrals` (True is not 1 here, nor False 0)."""
    return any(
        value is n or (not isinstance(value, bool) and not isinstance(n, bool) and value == n)
        for n in neutrals
    )


class ChatCompletionInputSerializer(InputSerializer):
    model = TextField(max_length=100)
    messages = serializers.ListField(
        child=ChatMessageSerializer(), min_length=1, max_length=MAX_MESSAGES
    )
    max_tokens = serializers.IntegerField(
        min_value=1, max_value=1_000_000, required=False, allow_null=True
    )
    max_completion_tokens = serializers.IntegerField(
        min_value=1, max_value=1_000_000, required=False, allow_null=True
    )
    temperature = StrictFloatField(min_value=0.0, max_value=2.0, required=False, allow_null=True)
    n = serializers.IntegerField(
        min_value=1,
        max_value=1,
        required=False,
        allow_null=True,
        error_messages={"max_value": "Not supported by this gateway: one choice per request."},
    )
    stream = StrictBooleanField(required=False, default=False, allow_null=True)
    stream_options = serializers.DictField(required=False, allow_null=True)
    priority = serializers.ChoiceField(choices=PRIORITIES, default="high")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A field this gateway would drop is refused by name, as OpenAI refuses an
        unrecognised argument, rather than answered as if it had not been sent."""
        for name, value in self.initial_data.items():
            if name in self.fields or name in _IGNORED:
                continue
            if name in _UNSUPPORTED_UNLESS:
                if not _neutral(value, _UNSUPPORTED_UNLESS[name]):
                    raise serializers.ValidationError({name: "Not supported by this gateway."})
                continue
            raise serializers.ValidationError({name: "Unrecognized request argument."})
        options = attrs.get("stream_options")
        if options is not None and not attrs.get("stream"):
            # As OpenAI: options of a stream on a request that is not one are a mistake.
            raise serializers.ValidationError(
                {"stream_options": "Only allowed when stream is true."}
            )
        include_usage = (options or {}).get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            # As `stream` (and OpenAI): a string or a number is not taken for a boolean.
            raise serializers.ValidationError(
                {"stream_options": {"include_usage": "Must be a boolean."}}
            )
        if attrs.get("max_tokens") is not None and attrs.get("max_completion_tokens") is not None:
            # OpenAI refuses the pair too: max_tokens is the older name of the same bound.
            raise serializers.ValidationError(
                {
                    "max_tokens": "Setting max_tokens and max_completion_tokens at the same "
                    "time is not supported."
                }
            )
        return attrs


class SubtopicsInputSerializer(InputSerializer):
    topic = TextField(max_length=200)
    count = serializers.IntegerField(min_value=3, max_value=12, default=6)
    model = TextField(max_length=100, required=False)
    priority = serializers.ChoiceField(choices=PRIORITIES, default="high")


class ExplanationsInputSerializer(InputSerializer):
    topic = TextField(max_length=200)
    subtopics = serializers.ListField(child=TextField(max_length=200), min_length=1, max_length=20)
    model = TextField(max_length=100, required=False)
    priority = serializers.ChoiceField(choices=PRIORITIES, default="high")


# --- response shapes (for the OpenAPI schema; the services build the bodies) -----------------


class UsageOutputSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class GenerateOutputSerializer(serializers.Serializer):
    id = serializers.CharField()
    request_id = serializers.CharField()
    model = serializers.CharField()
    text = serializers.CharField()
    usage = UsageOutputSerializer()
    cost_usd = serializers.CharField(help_text="USD as a decimal string.")
    cached = serializers.BooleanField()
    cache_layer = serializers.ChoiceField(
        choices=("memory", "redis"),
        allow_null=True,
        help_text="The cache layer a cached answer was taken from: memory (this worker's) or "
        "redis (shared), also for a request answered by an identical one's upstream call in "
        "flight at the same moment; null for an answer made for this request.",
    )
    fallback = serializers.BooleanField()


# `label` and `source` are attributes of DRF fields themselves: declared by name instead.
NodeOutputSerializer = inline_serializer(
    "TopicNode", {"id": serializers.CharField(), "label": serializers.CharField()}
)
EdgeOutputSerializer = inline_serializer(
    "TopicEdge", {"source": serializers.CharField(), "target": serializers.CharField()}
)


class SubtopicsOutputSerializer(serializers.Serializer):
    topic = serializers.CharField()
    nodes = serializers.ListField(child=NodeOutputSerializer)
    edges = serializers.ListField(child=EdgeOutputSerializer)
    usage = UsageOutputSerializer()
    cost_usd = serializers.CharField()
    cached = serializers.BooleanField()
    fallback = serializers.BooleanField()


class ItemErrorOutputSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ExplanationItemOutputSerializer(serializers.Serializer):
    subtopic = serializers.CharField()
    explanation = serializers.CharField(allow_null=True)
    cached = serializers.BooleanField()
    error = ItemErrorOutputSerializer(allow_null=True)


class ExplanationsOutputSerializer(serializers.Serializer):
    items = ExplanationItemOutputSerializer(many=True)
    usage = UsageOutputSerializer()
    cost_usd = serializers.CharField()
