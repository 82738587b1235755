"""OpenAPI descriptions of Tollgate's authentication schemes (drf-spectacular)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "quotas.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer tg_<prefix>_<secret>` (or `X-API-Key: ...`).",
        }


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
