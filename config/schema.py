"""The OpenAPI schema generator of the API (drf-spectacular)."""

from __future__ import annotations

import inspect
from typing import Any

from drf_spectacular.drainage import get_override
from drf_spectacular.openapi import AutoSchema


class TollgateAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, but a description is only what a view, handler or
    serializer says about itself: `inspect.getdoc` would otherwise hand every view or
    serializer without a docstring that of its first base class (how rate-limit headers or
    ETags are added, how fields are built), which tells an API user nothing."""

    def get_description(self) -> str:  # type: ignore[override]
        handler = getattr(self.view, getattr(self.view, "action", self.method.lower()), None)
        own = getattr(handler, "__doc__", None) or type(self.view).__dict__.get("__doc__")
        return inspect.cleandoc(own) if own else ""

    def _map_basic_serializer(self, serializer: Any, direction: str) -> dict[str, Any]:
        schema: dict[str, Any] = super()._map_basic_serializer(serializer, direction)
        own = type(serializer).__dict__.get("__doc__")
        if not get_override(serializer, "description"):  # @extend_schema_serializer wins
            if own:
                schema["description"] = inspect.cleandoc(own)
            else:
                schema.pop("description", None)
        return schema
