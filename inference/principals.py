"""Who is asking: an API key or a console user, resolved once to a :class:`Principal` that fixes the tenant.

Adapters authenticate here (``authenticate_api_key``, ``principal_for_user``, and
``principal_for_api_key_id`` for a stored key acting again in a batch job); the gateway
then asks ``authorize_completion`` whether the principal may spend.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone

from inference.errors import AuthenticationFailed, PermissionDenied
from inference.limits import Limits, key_limits, tenant_limits
from inference.runtime import db, db_read_once
from tenants import errors as tenant_errors
from tenants import selectors as tenant_selectors
from tenants import services as tenant_services

COMPLETIONS_SCOPE = "completions"


@dataclass(frozen=True)
class Principal:
    """Who is asking, resolved once: the tenant is fixed here and nowhere else."""

    tenant_id: int
    user_id: int | None
    api_key_id: int | None
    scopes: tuple[str, ...] = ()  # an API key's scopes; () = every scope
    role: str | None = None  # a console user's role in the tenant
    can_complete: bool = True  # False for roles that may only read (Membership.can_complete)
    limits: Limits | None = None  # the tenant's rate limits (None: the platform's defaults)
    key_limits: Limits | None = None  # an API key's own limits inside its tenant's (None: it has none)

    def may(self, scope: str) -> bool:
        return not self.scopes or scope in self.scopes


def authorize_completion(principal: Principal) -> None:
    """Refuse (403) a principal that may not run completions: a key without the scope, a viewer."""
    if not principal.may(COMPLETIONS_SCOPE):
        raise PermissionDenied(f"this API key lacks the {COMPLETIONS_SCOPE!r} scope")
    if not principal.can_complete:
        raise PermissionDenied(f"a {principal.role} may not run completions")


async def authenticate_api_key(raw_key: str) -> Principal:
    # A key this process checked moments ago is checked again in memory (revocation and
    # expiry included: see tenants.services._ApiKeyCache), with no hop to a DB thread.
    key = tenant_services.api_key_authenticate_cached(raw_key=raw_key, shared=True)
    if key is not None:
        # Built once per cached row and kept on it (a copy of the row and a rebuild cost 30 us
        # a request): a change to the key or its tenant's limits drops the row from the cache,
        # and the next read is a new instance. (Not a dict keyed by the row: model instances
        # compare by primary key, so the old row's entry would answer for the new one.)
        principal = getattr(key, CACHED_PRINCIPAL, None)
        if principal is None:
            principal = _key_principal(key)
            setattr(key, CACHED_PRINCIPAL, principal)
        return principal
    return await db_read_once(("api key", raw_key), _authenticate_api_key, raw_key)


CACHED_PRINCIPAL = "_tandem_principal"  # the attribute that holds it on the cache's row


def _authenticate_api_key(raw_key: str) -> Principal:
    try:
        key = tenant_services.api_key_authenticate(raw_key=raw_key)
    except tenant_errors.InvalidApiKey as exc:
        raise AuthenticationFailed(str(exc)) from None
    return _key_principal(key)


def _key_principal(key) -> Principal:
    """What an API key may do: act in its own tenant, for its creator, within its scopes."""
    return Principal(
        tenant_id=key.tenant_id,
        user_id=key.created_by_id,
        api_key_id=key.pk,
        scopes=tuple(key.scopes),
        limits=tenant_limits(key.tenant),
        key_limits=key_limits(key),
    )


async def principal_for_api_key_id(api_key_id: int, tenant_id: int) -> Principal:
    """A stored key acting again later (a batch job): refused if it was revoked, expired or moved."""
    return await db(_principal_for_api_key_id)(api_key_id, tenant_id)


def _principal_for_api_key_id(api_key_id: int, tenant_id: int) -> Principal:
    from tenants.models import ApiKey

    key = ApiKey.objects.select_related("tenant").filter(pk=api_key_id, tenant_id=tenant_id).first()
    if key is None or not key.is_usable_at(timezone.now()):
        raise AuthenticationFailed("the API key of this job is no longer valid")
    return _key_principal(key)


async def principal_for_user(user, tenant_id: int | None) -> Principal:
    """A signed-in console user acting in one of their tenants (their first one when not given)."""
    return await db(_principal_for_user)(user, tenant_id)


def _principal_for_user(user, tenant_id: int | None) -> Principal:
    if user is None or not user.is_authenticated:
        raise AuthenticationFailed("sign in first", code="not_authenticated")
    if tenant_id is None:
        membership = tenant_selectors.memberships_for_user(user=user).order_by("pk").first()
        if membership is None:
            raise PermissionDenied("you are not a member of any tenant")
    else:
        try:
            membership = tenant_selectors.membership_get(user=user, tenant_id=tenant_id)
        except tenant_errors.NotAMember:
            raise PermissionDenied(f"you are not a member of tenant {tenant_id}") from None
    return Principal(
        tenant_id=membership.tenant_id,
        user_id=user.pk,
        api_key_id=None,
        role=membership.role,
        can_complete=membership.can_complete,
        limits=tenant_limits(membership.tenant),
    )
