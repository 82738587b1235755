"""A base class for request-body serializers on the hot path."""

from __future__ import annotations

import threading
from functools import cached_property

from rest_framework import serializers
from rest_framework.utils.serializer_helpers import BindingDict

_built = threading.local()


class InputSerializer(serializers.Serializer):
    """A request-body serializer whose fields are built once per class and thread.

    DRF deep-copies every declared field (nested serializers included) for each new
    serializer instance, which costs more than validating a small body. Here the copy is
    made the first time a thread uses the class and re-bound to each later instance.
    That is safe because a thread validates one request at a time and an input serializer
    is only validated and then read (`validated_data`, `errors`): don't add, remove or
    alter fields per instance, and don't keep an instance to validate again after another
    instance of the same class was created on the same thread.
    """

    @cached_property
    def fields(self) -> BindingDict:  # type: ignore[override]
        built: dict[type, BindingDict] = _built.__dict__.setdefault("fields", {})
        fields = built.get(type(self))
        if fields is None:
            fields = BindingDict(self)
            for name, field in self.get_fields().items():
                fields[name] = field
            built[type(self)] = fields
            return fields
        fields.serializer = self
        for field in fields.values():
            field.parent = self
        return fields


class TextField(serializers.CharField):
    """A CharField that takes a JSON string only: DRF's would read 123 as "123", where a
    client that sent a number for a text has made a mistake it should hear of."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: object) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    """A BooleanField that takes a JSON true or false only (or null where allowed): DRF's
    reads "yes", "on", "1" and 1 as true and "no", "off", "0" and 0 as false, where OpenAI
    refuses anything but a boolean."""

    default_error_messages = {"invalid": "Must be a boolean."}

    def to_internal_value(self, data: object) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictFloatField(serializers.FloatField):
    """A FloatField that refuses a JSON boolean: DRF's reads true as 1.0 and false as 0.0,
    so a client that sent a flag where a number belongs (a temperature) would be answered
    at a value it never chose, where OpenAI refuses the type."""

    default_error_messages = {"invalid": "Must be a number."}

    def to_internal_value(self, data: float | int | str) -> float:
        if isinstance(data, bool):
            self.fail("invalid")
        return float(super().to_internal_value(data))
