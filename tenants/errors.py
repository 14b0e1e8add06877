"""The tenants app's errors: one small hierarchy, mapped once at each adapter's edge (HTTP, OpenAI, websocket).

Messages are written for the person who will read them; none of them leaks what a caller
may not know (an invalid API key never says whether it was unknown, revoked or expired).
"""

from __future__ import annotations

from decimal import Decimal


class TenantsError(Exception):
    """Base of every error the tenants services and selectors raise on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(TenantsError):
    """A caller passed a value the service refuses (unknown role or scope, negative money, taken slug...)."""


class InvalidApiKey(TenantsError):
    """The key is unknown, malformed, revoked or expired: deliberately one message for all four."""

    def __init__(self, message: str = "invalid API key"):
        super().__init__(message)


class NotAMember(TenantsError):
    """The user has no membership in that tenant (or the tenant does not exist: the message does not say)."""

    def __init__(self, message: str = "not a member of this tenant"):
        super().__init__(message)


class PermissionDenied(TenantsError):
    """The user is a member, but their role does not allow this action."""


class BudgetExceeded(TenantsError):
    """Reserving the request's worst-case cost would take a budget past its hard limit; nothing was reserved."""

    def __init__(
        self,
        message: str,
        *,
        budget_id: int,
        limit: Decimal,
        left: Decimal,
        requested: Decimal,
        may_fit_later: bool = False,
    ):
        super().__init__(message)
        self.budget_id = budget_id
        self.limit = limit
        self.left = left
        self.requested = requested
        # other requests hold money that, once they settle, may leave room for this one
        self.may_fit_later = may_fit_later


class PriceNotFound(TenantsError):
    """No price for this model and tier in the price book that applies."""


class AlreadySettled(TenantsError):
    """The reservation no longer holds money (it was settled or released): it cannot be settled or released again."""
