"""Key scopes: what an API key may call.

A key's scopes are a list of names. Endpoint scopes: `generate` (generation, chat
completions and the model list, topics, batch jobs) and `usage` (reading its usage and
its jobs; any key may read its own quota standing). `model:<name>` entries restrict the
models a key may use (enforced by admission, and shown by /v1/models). A key with no
endpoint scope may call every endpoint; DRF tokens and sessions are not scoped. A view
declares the scope it needs in `key_scope`, or a tuple of scopes any one of which will do
(a job is read with the `generate` scope that created it as well as with `usage`). A view
that names no scope (the staff endpoints) is refused to a key with endpoint scopes: a
staff member's key made for an application may not flush the cache.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission, IsAdminUser
from rest_framework.request import Request

from quotas.authentication import KeyPrincipal
from quotas.errors import UserSuspended
from quotas.models import UserQuota

ENDPOINT_SCOPES = ("generate", "usage")


def scope_is_known(scope: str) -> bool:
    return scope in ENDPOINT_SCOPES or (scope.startswith("model:") and len(scope) > 6)


class KeyScopePermission(BasePermission):
    message = "This API key does not have the scope this endpoint needs."

    def has_permission(self, request: Request, view: Any) -> bool:
        auth = request.auth
        if not isinstance(auth, KeyPrincipal):
            return True
        granted = [s for s in auth.scopes if not s.startswith("model:")]
        needed = getattr(view, "key_scope", None) or ()
        any_of = (needed,) if isinstance(needed, str) else tuple(needed)
        return not granted or any(scope in granted for scope in any_of)


def acts_as_staff(request: Request) -> bool:
    """Whether the request carries staff's powers: a staff user with a session, a DRF token
    or a key without endpoint scopes. A staff member's scoped key reaches what any user's
    would (its own usage and jobs), not every user's."""
    if not getattr(request.user, "is_staff", False):
        return False
    auth = request.auth
    return not (
        isinstance(auth, KeyPrincipal) and any(not s.startswith("model:") for s in auth.scopes)
    )


class IsStaff(IsAdminUser):
    """Operators' endpoints (global quotas, the cache's statistics and invalidation): staff,
    with a session, a DRF token or a key without endpoint scopes (KeyScopePermission)."""

    message = "This endpoint is for staff only."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not super().has_permission(request, view):
            return False
        scopes = KeyScopePermission()
        if not scopes.has_permission(request, view):
            self.message = scopes.message  # an instance per request: DRF makes one each time
            return False
        return True


class NotSuspended(BasePermission):
    """403 for a suspended user, on the views no admission guards (usage, jobs): only
    `GET /api/v1/quota` answers a suspended user. One indexed query, read each time, so a
    suspension holds at once on every worker."""

    def has_permission(self, request: Request, view: Any) -> bool:
        user_id = getattr(request.user, "pk", None)
        if (
            user_id is not None
            and UserQuota.objects.filter(user_id=user_id, suspended=True).exists()
        ):
            raise UserSuspended()
        return True
