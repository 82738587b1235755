"""OpenAPI descriptions of Tollgate's authentication schemes (drf-spectacular)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """A Tollgate key, in either header: two schemes, either of which will do."""

    target_class = "quotas.authentication.ApiKeyAuthentication"
    name = ["apiKey", "apiKeyHeader"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{name: []} for name in self.name]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [
            {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer tg_<prefix>_<secret>`.",
            },
            {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "`X-API-Key: tg_<prefix>_<secret>`.",
            },
        ]


class TokenScheme(OpenApiAuthenticationExtension):
    target_class = "quotas.authentication.BearerTokenAuthentication"
    name = "drfToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Authorization: Token <token>`: a user acting without a key.",
        }
