"""The API's JSON parser."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class BoundedJSONParser(JSONParser):
    """DRF's JSONParser, but a body nested deeper than Python's recursion limit (e.g. 100,000
    `[`, well within API_MAX_BODY_BYTES) is a 400 invalid_request instead of the 500 that
    the RecursionError of `json.loads` would otherwise turn into."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - the body is nested too deeply.") from exc
