"""Writes of the tenants app: tenants, the team (invites, roles), API keys, budgets, price books, the audit log, and
the money path.

The money path, as the gateway runs it for every request::

    price = selectors.price_active(model=..., tier=...)
    amount = cost_estimate_max(price=price, prompt_tokens=..., max_tokens=...)
    reservation = budget_reserve(tenant=..., api_key=..., amount=amount, request_id=..., price=price)
    ... stream ...
    usage_settle(reservation=reservation, usage=Usage(...))   # or reservation_release(...) if nothing was produced

Every function here is keyword-only and atomic. Costs come from one function,
``cost_compute``; the reservation (``cost_estimate_max``) and the charge (``usage_cost``)
both call it, which is what lets a settlement never exceed its reservation.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, ROUND_UP, Decimal, localcontext
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Max, Model
from django.utils import timezone
from django.utils.text import slugify

from tenants import errors, selectors
from tenants.models import (
    ApiKey,
    AuditEvent,
    Budget,
    BudgetLease,
    Invite,
    Membership,
    Price,
    PriceBook,
    Reservation,
    Tenant,
    UsageRecord,
    UsageSource,
)
from tenants.tiers import TIER_VALUES, Tier

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

logger = logging.getLogger(__name__)

# Mirrors speculative.types.MAX_DRAFT_TOKENS (tenants must not import speculative; a test
# checks the two agree): the controller drafts at most this many tokens per round, and
# every round emits at least one token, so a request drafts at most 16 per emitted token.
MAX_DRAFT_TOKENS = 16

MONEY_QUANTUM = Decimal("0.000000001")  # DecimalField(decimal_places=9)
COUNT_QUANTUM = Decimal("0.001")  # drafted_tokens and gpu_ms: decimal_places=3
TOKENS_PER_MTOK = Decimal(1_000_000)
MS_PER_HOUR = Decimal(3_600_000)
# Enough digits that no product of a count and a rate is rounded before the quantization
# to nano-units (20-digit rates times 10-digit counts need 30; the default context has 28).
_COST_PRECISION = 60

API_KEY_PREFIX = "tdm"
# tdm_<8 hex>_<secrets.token_urlsafe(32): 43 urlsafe characters>
_API_KEY_RE = re.compile(r"tdm_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
# last_used_at is for people ("used today?"), not for audit: at most one write a minute
# per key keeps authentication from writing a row on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)

# Which cost bucket a tier's own token charges go to.
_TIER_BUCKET = {Tier.EDGE: "edge", Tier.SPECULATIVE: "verifier", Tier.CLOUD: "cloud"}
_PRICE_REQUIRED = ("model", "tier", "prompt_per_mtok", "completion_per_mtok")
PRICE_RATES = (
    "prompt_per_mtok",
    "completion_per_mtok",
    "draft_per_mtok",
    "gpu_per_hour",
    "max_gpu_ms_per_token",
    "cache_per_mtok",
    "batch_discount",  # a percentage, not a rate: what a batch job's request is charged less (batch_discounted)
)


@dataclass(frozen=True)
class Usage:
    """What one request used, as the gateway reports it to ``usage_settle``."""

    request_id: str
    user_id: int | None
    tags: Mapping[str, str]
    route_tier: str
    route_reason: str
    policy_version: str
    model: str
    verifier_version: str
    draft_version: str
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: Decimal
    accepted_tokens: int
    gpu_ms: Decimal
    outcome: str
    draft_rejections: int = 0  # rounds whose draft the verifier cut short
    finish_reason: str = ""
    error: str = ""
    ttft_ms: float | None = None
    duration_ms: float | None = None
    # a leg of a request served by several tiers in turn; leg 0's request_id is the request's
    leg: int = 0
    leg_of: str = ""  # the request's id ("" = request_id)
    escalation: bool = False
    route_signals: Mapping[str, Any] = field(default_factory=dict)
    upstream: str = ""
    # "generation", or a cache's ("exact_cache"): a replay is charged the tier's cache rate;
    # ``replayed_cost`` is what the answer it replays cost to generate (its saving is the difference)
    source: str = "generation"
    replayed_cost: Decimal | None = None
    latency_class: str = "interactive"  # "batch": a batch job's line (priced at the book's batch discount)


@dataclass(frozen=True)
class CostBreakdown:
    """A cost by bucket: drafts on the edge, verifier GPU time and tokens, cloud tokens. ``total`` is their sum."""

    edge: Decimal
    verifier: Decimal
    cloud: Decimal
    total: Decimal = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.edge + self.verifier + self.cloud)

    def capped_at(self, limit: Decimal) -> CostBreakdown:
        """This cost scaled down to ``limit`` when it is above it, buckets still adding up to the total exactly."""
        if self.total <= limit:
            return self
        with localcontext() as ctx:
            ctx.prec = _COST_PRECISION
            # Round each scaled bucket down so their sum cannot pass the limit, then give
            # the rounding remainder (a few nano-units) to the largest bucket.
            scaled = [(b * limit / self.total).quantize(MONEY_QUANTUM, ROUND_DOWN) for b in self._buckets()]
            largest = max(range(3), key=lambda i: scaled[i])
            scaled[largest] += limit - sum(scaled, Decimal(0))
        return CostBreakdown(edge=scaled[0], verifier=scaled[1], cloud=scaled[2])

    def _buckets(self) -> list[Decimal]:
        return [self.edge, self.verifier, self.cloud]


# --- the audit log ----------------------------------------------------------------------
#
# Every service below that changes a tenant's configuration or people (and the price book,
# and inference's policies and upstreams) records one ``AuditEvent`` in its own
# transaction: the change and its record commit or roll back together, whichever adapter
# (console, API, admin, management command) called the service.

# Field names that must never reach an event: the services choose what they record, and
# this is the check that a slip (a raw key, a token, a password) fails loudly instead.
_AUDIT_SECRET_NAME = re.compile(r"password|secret|raw_key|key_hash|token_hash|(^|_)token$", re.IGNORECASE)


def _audit_value(value: Any) -> Any:
    """A field's value as JSON keeps it, exactly: money as a decimal string, times in ISO 8601, rows by id."""
    if isinstance(value, Decimal):
        return _fmt(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Model):
        return value.pk
    if isinstance(value, list | tuple | set | frozenset):
        items = [_audit_value(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, Mapping):
        return {str(k): _audit_value(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def audit_changes(*, before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"field": {"before": ..., "after": ...}}`` for each field of ``after`` whose value differs from ``before``'s.

    A field missing from ``before`` (a new row) has ``before`` None.
    """
    changes = {}
    for name, value in after.items():
        old, new = _audit_value(before.get(name)), _audit_value(value)
        if old != new:
            changes[name] = {"before": old, "after": new}
    return changes


@transaction.atomic
def audit_event_record(
    *,
    action: str,
    by: User | ApiKey | None,
    tenant: Tenant | None,
    obj: Model,
    changes: Mapping[str, Any],
) -> AuditEvent:
    """Append one event: ``by`` (a user, an API key, or None for the system) did ``action`` to ``obj`` in ``tenant``.

    Call it inside the transaction of the change it records. ``tenant`` None is a
    platform-wide change (the price book, the default routing policy, an upstream).
    """
    if action not in AuditEvent.Action.values:
        raise errors.InvalidInput(f"unknown audit action {action!r}")
    leaked = [name for name in changes if _AUDIT_SECRET_NAME.search(name)]
    if leaked:
        raise errors.InvalidInput(f"audit events never hold secrets: {leaked}")
    event = AuditEvent(
        tenant=tenant,
        action=action,
        object_type=obj._meta.label_lower,
        object_id=str(obj.pk),
        changes=_audit_value(dict(changes)),
    )
    if isinstance(by, ApiKey):
        event.actor_kind, event.actor_api_key, event.actor_label = AuditEvent.ActorKind.API_KEY, by, by.prefix
    elif by is not None:
        event.actor_kind, event.actor_user, event.actor_label = AuditEvent.ActorKind.USER, by, by.get_username()
    else:
        event.actor_kind, event.actor_label = AuditEvent.ActorKind.SYSTEM, "system"
    event.save()
    return event


# --- tenants and memberships ------------------------------------------------------------


@transaction.atomic
def tenant_create(*, name: str, owner: User, slug: str | None = None) -> Tenant:
    """A tenant with ``owner`` as its owner. Without a slug, one is made from the name (made unique with -2, -3...)."""
    name = name.strip()
    if not name:
        raise errors.InvalidInput("a tenant needs a name")
    if slug is not None:
        if slug != slugify(slug) or not slug:
            raise errors.InvalidInput(f"{slug!r} is not a valid slug (lowercase letters, digits, - and _)")
        if Tenant.objects.filter(slug=slug).exists():
            raise errors.InvalidInput(f"the slug {slug!r} is taken")
        candidates: Iterable[str] = [slug]
    else:
        base = slugify(name)[:50] or "tenant"
        candidates = (base if n == 1 else f"{base}-{n}" for n in range(1, 1000))
    for candidate in candidates:
        if Tenant.objects.filter(slug=candidate).exists():
            continue
        try:
            with transaction.atomic():
                tenant = Tenant.objects.create(name=name, slug=candidate)
        except IntegrityError:
            # taken by a concurrent create between the check and the insert
            if slug is not None:
                raise errors.InvalidInput(f"the slug {slug!r} is taken") from None
            continue
        Membership.objects.create(user=owner, tenant=tenant, role=Membership.Role.OWNER)
        return tenant
    raise errors.InvalidInput(f"no free slug for the name {name!r}: pass one")


@transaction.atomic
def membership_create(*, tenant: Tenant, user: User, role: str, by: User | None = None) -> Membership:
    """Add ``user`` to ``tenant`` directly (people join through invites; this is for the admin and commands).

    ``by`` must be an owner or admin (an owner to add an owner); ``None`` is for system callers.
    """
    if role not in Membership.Role.values:
        raise errors.InvalidInput(f"unknown role {role!r}: one of {', '.join(Membership.Role.values)}")
    if by is not None:
        _team_permission(_membership_of(by, tenant.pk), touches_owner=role == Membership.Role.OWNER)
    if Membership.objects.filter(tenant=tenant, user=user).exists():
        raise errors.InvalidInput(f"{user} is already a member of {tenant}")
    try:
        with transaction.atomic():
            membership = Membership.objects.create(tenant=tenant, user=user, role=role)
    except IntegrityError:
        raise errors.InvalidInput(f"{user} is already a member of {tenant}") from None
    audit_event_record(
        action=AuditEvent.Action.MEMBER_ADD,
        by=by,
        tenant=tenant,
        obj=membership,
        changes=audit_changes(before={}, after={"user": user.get_username(), "role": role}),
    )
    return membership


def _membership_of(user: User, tenant_id: int) -> Membership:
    try:
        return Membership.objects.get(user=user, tenant_id=tenant_id)
    except Membership.DoesNotExist:
        raise errors.NotAMember() from None


# --- the team: invites, roles, removals ---------------------------------------------------
#
# Who may do what: owners and admins invite, change roles and remove members; only an
# owner makes, unmakes or removes an owner; anyone may leave; and a tenant always keeps at
# least one owner. Every change locks the tenant's row first, so two concurrent demotions
# of its last two owners cannot both see another owner left.

INVITE_TTL = timedelta(days=7)


def _tenant_lock(tenant_id: int) -> Tenant:
    return Tenant.objects.select_for_update().get(pk=tenant_id)


def _team_permission(by: Membership, *, touches_owner: bool) -> None:
    if not by.can_manage:
        raise errors.PermissionDenied("only owners and admins manage the team")
    if touches_owner and by.role != Membership.Role.OWNER:
        raise errors.PermissionDenied("only an owner can make, change or remove an owner")


def _last_owner_check(membership: Membership) -> None:
    if membership.role != Membership.Role.OWNER:
        return
    if (
        not Membership.objects.filter(tenant_id=membership.tenant_id, role=Membership.Role.OWNER)
        .exclude(pk=membership.pk)
        .exists()
    ):
        raise errors.InvalidInput("a tenant keeps at least one owner: make someone else an owner first")


@transaction.atomic
def invite_create(*, tenant: Tenant, email: str, role: str, by: User) -> tuple[Invite, str]:
    """An invite of ``email`` to ``tenant`` as ``role``, and its one-time token: returned now, never stored.

    The caller turns the token into the link it shows or mails; only its hash is kept.
    """
    _tenant_lock(tenant.pk)
    if role not in Membership.Role.values:
        raise errors.InvalidInput(f"unknown role {role!r}: one of {', '.join(Membership.Role.values)}")
    _team_permission(_membership_of(by, tenant.pk), touches_owner=role == Membership.Role.OWNER)
    email = (email or "").strip()
    if not email or "@" not in email or len(email) > 254:
        raise errors.InvalidInput("an invite needs an email address")
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise errors.InvalidInput(f"{email} is already a member of {tenant}")
    now = timezone.now()
    pending = Invite.objects.filter(
        tenant=tenant, email__iexact=email, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=now
    )
    if pending.exists():
        raise errors.InvalidInput(f"{email} already has a pending invite: revoke it to send a new one")
    raw_token = secrets.token_urlsafe(32)
    invite = Invite.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        token_hash=Invite.hash_token(raw_token),
        invited_by=by,
        expires_at=now + INVITE_TTL,
    )
    audit_event_record(
        action=AuditEvent.Action.MEMBER_INVITE,
        by=by,
        tenant=tenant,
        obj=invite,
        changes=audit_changes(before={}, after={"email": email, "role": role, "expires_at": invite.expires_at}),
    )
    return invite, raw_token


@transaction.atomic
def invite_revoke(*, invite: Invite, by: User) -> Invite:
    """Revoke a pending invite: its link stops working. Revoking one no longer pending changes nothing."""
    _tenant_lock(invite.tenant_id)
    _team_permission(_membership_of(by, invite.tenant_id), touches_owner=invite.role == Membership.Role.OWNER)
    locked = Invite.objects.select_for_update().get(pk=invite.pk)
    if locked.state_at(timezone.now()) == "pending":
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_event_record(
            action=AuditEvent.Action.INVITE_REVOKE,
            by=by,
            tenant=locked.tenant,
            obj=locked,
            changes=audit_changes(before={"revoked_at": None}, after={"revoked_at": locked.revoked_at}),
        )
    return locked


def _invite_lock_pending(raw_token: str) -> Invite:
    """The invite whose link holds ``raw_token``, locked (its tenant first), if still pending; else ``InvalidInput``.

    The tenant's row is locked before the invite's, the order every team service takes, so
    an acceptance and a revocation of one invite queue instead of deadlocking.
    """
    if not isinstance(raw_token, str) or not 0 < len(raw_token) <= 100:
        raise errors.InvalidInput("this invite link is not valid")
    found = Invite.objects.filter(token_hash=Invite.hash_token(raw_token)).values_list("pk", "tenant_id").first()
    if found is None:
        raise errors.InvalidInput("this invite link is not valid")
    _tenant_lock(found[1])
    invite = Invite.objects.select_for_update(of=("self",)).select_related("tenant").get(pk=found[0])
    state = invite.state_at(timezone.now())
    if state != "pending":
        # Told to whoever holds the link, who already knows the invite exists.
        raise errors.InvalidInput(f"this invite was {'used' if state == 'accepted' else state}: ask for a new one")
    return invite


@transaction.atomic
def invite_accept(*, raw_token: str, user: User) -> Membership:
    """``user`` joins the invite's tenant with its role; the invite is used up. Once: a second use is refused."""
    invite = _invite_lock_pending(raw_token)
    if Membership.objects.filter(tenant_id=invite.tenant_id, user_id=user.pk).exists():
        raise errors.InvalidInput(f"you are already a member of {invite.tenant}")
    membership = Membership.objects.create(tenant_id=invite.tenant_id, user=user, role=invite.role)
    invite.accepted_at = timezone.now()
    invite.accepted_by = user
    invite.save(update_fields=["accepted_at", "accepted_by"])
    audit_event_record(
        action=AuditEvent.Action.INVITE_ACCEPT,
        by=user,
        tenant=invite.tenant,
        obj=invite,
        changes=audit_changes(
            before={}, after={"email": invite.email, "role": invite.role, "user": user.get_username()}
        ),
    )
    return membership


@transaction.atomic
def invite_accept_signup(*, raw_token: str, username: str, password: str) -> Membership:
    """A new account (with the invite's email) that joins the invite's tenant: both or neither.

    The password is checked by the caller's form (Django's validators); it is stored
    hashed by ``create_user`` and recorded nowhere else.
    """
    invite = _invite_lock_pending(raw_token)  # refuse a used link before creating anyone
    user_model = get_user_model()
    username = (username or "").strip()
    if not username:
        raise errors.InvalidInput("an account needs a username")
    if user_model.objects.filter(username__iexact=username).exists():
        raise errors.InvalidInput("that username is taken")
    user = user_model.objects.create_user(username=username, email=invite.email, password=password)
    return invite_accept(raw_token=raw_token, user=user)


@transaction.atomic
def membership_role_set(*, membership: Membership, role: str, by: User | None) -> Membership:
    """Change a member's role: owners and admins may, only an owner to or from owner, never the last owner's.

    ``by`` None is a system caller (the Django admin): no role check, but the last owner stays one.
    """
    if role not in Membership.Role.values:
        raise errors.InvalidInput(f"unknown role {role!r}: one of {', '.join(Membership.Role.values)}")
    _tenant_lock(membership.tenant_id)
    locked = Membership.objects.select_for_update(of=("self",)).select_related("user", "tenant").get(pk=membership.pk)
    owner = Membership.Role.OWNER
    if by is not None:
        _team_permission(_membership_of(by, locked.tenant_id), touches_owner=owner in (locked.role, role))
    if role == locked.role:
        return locked
    if role != owner:
        _last_owner_check(locked)
    before = locked.role
    locked.role = role
    locked.save(update_fields=["role"])
    audit_event_record(
        action=AuditEvent.Action.MEMBER_ROLE,
        by=by,
        tenant=locked.tenant,
        obj=locked,
        changes={"user": {"before": locked.user.get_username(), "after": locked.user.get_username()}}
        | audit_changes(before={"role": before}, after={"role": role}),
    )
    membership.role = role
    return locked


@transaction.atomic
def membership_remove(*, membership: Membership, by: User | None) -> None:
    """Remove a member from the tenant (or, ``by`` themselves, leave it); never its last owner.

    ``by`` None is a system caller (the Django admin): no role check, but the last owner stays.
    """
    _tenant_lock(membership.tenant_id)
    locked = Membership.objects.select_for_update(of=("self",)).select_related("user", "tenant").get(pk=membership.pk)
    if by is not None and locked.user_id != by.pk:  # leaving needs no permission; removing someone else does
        _team_permission(_membership_of(by, locked.tenant_id), touches_owner=locked.role == Membership.Role.OWNER)
    _last_owner_check(locked)
    audit_event_record(
        action=AuditEvent.Action.MEMBER_REMOVE,
        by=by,
        tenant=locked.tenant,
        obj=locked,
        changes=audit_changes(
            before={"user": locked.user.get_username(), "role": locked.role}, after={"user": None, "role": None}
        ),
    )
    locked.delete()


# --- API keys ---------------------------------------------------------------------------


def _api_key_hash(raw_key: str) -> str:
    # A fast hash is safe here, unlike for passwords: the secret is 256 random bits, so
    # no guessing or precomputation can get near it, and a slow hash would only slow
    # every authenticated request. sha256 also makes the hash a unique index to look up.
    return hashlib.sha256(raw_key.encode()).hexdigest()


@transaction.atomic
def api_key_create(
    *,
    tenant: Tenant,
    created_by: User | None,
    name: str,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key and the full key ``tdm_<8 hex>_<secret>``: returned now, never stored, never shown again.

    ``created_by`` must be a member who may run completions (owners, admins, members);
    ``None`` is for system callers (management commands, the tenants' own tests).
    """
    if created_by is not None and not _membership_of(created_by, tenant.pk).can_complete:
        raise errors.PermissionDenied("viewers cannot create API keys")
    name = name.strip()
    if not name or len(name) > 100:
        raise errors.InvalidInput("a key needs a name of 1 to 100 characters")
    scopes = sorted(set(scopes or []))
    unknown = [s for s in scopes if s not in ApiKey.Scope.values]
    if unknown:
        raise errors.InvalidInput(f"unknown scopes {unknown}: known are {ApiKey.Scope.values}")
    if expires_at is not None and (timezone.is_naive(expires_at) or expires_at <= timezone.now()):
        raise errors.InvalidInput("expires_at must be an aware datetime in the future")
    # The visible prefix has 32 bits, so two keys may draw the same one (the secret never
    # collides): draw again. The unique constraint, not a prior lookup, is what decides.
    for _ in range(5):
        prefix = f"{API_KEY_PREFIX}_{secrets.token_hex(4)}"
        raw_key = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    tenant=tenant,
                    created_by=created_by,
                    name=name,
                    prefix=prefix,
                    key_hash=_api_key_hash(raw_key),
                    scopes=scopes,
                    expires_at=expires_at,
                )
        except IntegrityError:
            if not ApiKey.objects.filter(prefix=prefix).exists():
                raise
            continue
        # The prefix is no secret (it names the key in lists and logs); the key and its hash stay out.
        fields = {"name": name, "prefix": prefix, "scopes": scopes, "expires_at": expires_at}
        audit_event_record(
            action=AuditEvent.Action.API_KEY_CREATE,
            by=created_by,
            tenant=tenant,
            obj=api_key,
            changes=audit_changes(before={}, after=fields),
        )
        return api_key, raw_key
    raise RuntimeError("five API key prefixes in a row were taken: the random source is broken")


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, by: User | None = None) -> ApiKey:
    """Revoke the key now (revoking a revoked key keeps its first revocation time).

    ``by`` must be an owner or admin of the key's tenant, or the member who created it;
    ``None`` is for system callers (the Django admin, which logs who did it).
    """
    if by is not None and not _membership_of(by, api_key.tenant_id).can_manage_key(api_key):
        raise errors.PermissionDenied("only owners, admins and the key's creator can revoke it")
    locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        # Explicitly, though post_save does it too: the key stops in this process now.
        api_key_cache_forget(api_key=locked)
        logger.info("api key revoked", extra={"api_key": locked.prefix, "tenant_id": locked.tenant_id})
        audit_event_record(
            action=AuditEvent.Action.API_KEY_REVOKE,
            by=by,
            tenant=locked.tenant,
            obj=locked,
            changes={"prefix": {"before": locked.prefix, "after": locked.prefix}}
            | audit_changes(before={"revoked_at": None}, after={"revoked_at": locked.revoked_at}),
        )
    api_key.revoked_at = locked.revoked_at
    return api_key


RATE_LIMIT_FIELDS = ("max_streams", "requests_per_minute", "tokens_per_minute")


@transaction.atomic
def rate_limits_set(
    *,
    target: Tenant | ApiKey,
    max_streams: int | None,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    by: User | None = None,
) -> Tenant | ApiKey:
    """Set a tenant's or one of its keys' rate limits (None: the level above's, see ``RateLimits``).

    ``by`` must be an owner or admin of the tenant; ``None`` is for system callers (the
    Django admin). Every value is a whole number of at least 1 (0 would stop the tenant:
    revoke its keys for that). Requests already running keep the limits they started with;
    new ones see the change in this process at once and in others within
    ``TANDEM_API_KEY_CACHE_TTL_S``.
    """
    tenant_id = target.pk if isinstance(target, Tenant) else target.tenant_id
    if by is not None and not _membership_of(by, tenant_id).can_manage:
        raise errors.PermissionDenied("only owners and admins can change rate limits")
    values = {
        "max_streams": max_streams,
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
    }
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1):
            raise errors.InvalidInput(
                f"{name.replace('_', ' ')} must be a whole number from 1, or empty, got {value!r}"
            )
    model = type(target)
    before = model.objects.select_for_update().filter(pk=target.pk).values(*RATE_LIMIT_FIELDS).get()
    model.objects.filter(pk=target.pk).update(**values)
    changes = audit_changes(before=before, after=values)
    if changes:  # the admin saves a tenant's limits with every edit of it: record real changes only
        audit_event_record(
            action=AuditEvent.Action.LIMITS_SET,
            by=by,
            tenant=target if isinstance(target, Tenant) else target.tenant,
            obj=target,
            changes=changes,
        )
    for name, value in values.items():
        setattr(target, name, value)
    if isinstance(target, ApiKey):
        api_key_cache_forget(api_key=target)
    else:
        for key in ApiKey.objects.filter(tenant_id=target.pk):
            api_key_cache_forget(api_key=key)  # a cached key carries its tenant's limits
    logger.info(
        "rate limits set",
        extra={"tenant_id": tenant_id, "api_key": getattr(target, "prefix", None), **values},
    )
    return target


class _ApiKeyCache:
    """Key rows by key hash, kept in this process for at most ``TANDEM_API_KEY_CACHE_TTL_S``.

    Security: the cache only saves the lookup. Every use still checks the row's
    ``revoked_at`` and ``expires_at`` against the clock, so an expired key stops at its
    expiry to the second. A revocation (or any change to a key, in the admin too) that
    commits in this process drops the key at once (``forget``, from ``post_save``/
    ``post_delete``); one made by another process is seen here within the TTL: that is the
    worst-case window during which a revoked key still starts requests. Unknown keys are
    never cached (a guesser cannot fill memory), and a lookup that raced a change is not
    stored (the generation counter), so a stale row cannot outlive a ``forget``.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[float, ApiKey]] = {}
        self._generation = 0
        self.clock = time.monotonic  # tests move it

    def get(self, key_hash: str, ttl_s: float, *, shared: bool = False) -> tuple[ApiKey | None, int]:
        """The cached row and the generation; a copy unless ``shared`` (the caller will not change it)."""
        with self._lock:
            entry = self._rows.get(key_hash)
            generation = self._generation
        if entry is not None and self.clock() - entry[0] < ttl_s:
            return (entry[1] if shared else copy.copy(entry[1])), generation
        return None, generation

    def put(self, key_hash: str, api_key: ApiKey, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a key changed while this row was read: it may be the stale one
            if len(self._rows) >= self.MAX_ENTRIES:
                self._rows.clear()
            self._rows[key_hash] = (self.clock(), copy.copy(api_key))

    def forget(self, key_hash: str | None = None) -> None:
        """Drop one key (or every key): the next use reads the row again."""
        with self._lock:
            self._generation += 1
            if key_hash is None:
                self._rows.clear()
            else:
                self._rows.pop(key_hash, None)


api_key_cache = _ApiKeyCache()


def api_key_cache_forget(*, api_key: ApiKey) -> None:
    """Drop ``api_key`` from this process's cache now and again when the current transaction commits.

    Now, so no request after the change is served from the old row; on commit too, so a
    lookup that read the row between now and the commit cannot put the old row back.
    """
    api_key_cache.forget(api_key.key_hash)
    transaction.on_commit(lambda: api_key_cache.forget(api_key.key_hash))


def api_key_authenticate_cached(*, raw_key: str, shared: bool = False) -> ApiKey | None:
    """``api_key_authenticate`` without the database, when this process has the key at hand; else None.

    None is not a refusal: it means "ask ``api_key_authenticate``", which reads the row,
    writes ``last_used_at`` when it is due, and refuses what must be refused. So this
    never accepts a key that ``api_key_authenticate`` would refuse from the same row, and
    it is safe to call on an event loop (no query, no write).

    ``shared``: the cache's own instance, not a copy, for a caller that only reads it (the
    same instance until the cache reads the row again, so a caller may memoise on it).
    """
    if not isinstance(raw_key, str) or not _API_KEY_RE.fullmatch(raw_key):
        return None
    api_key, _ = api_key_cache.get(_api_key_hash(raw_key), settings.TANDEM_API_KEY_CACHE_TTL_S, shared=shared)
    if api_key is None:
        return None
    now = timezone.now()
    if not api_key.is_usable_at(now):
        return None
    if api_key.last_used_at is None or api_key.last_used_at <= now - LAST_USED_RESOLUTION:
        return None  # last_used_at is due a write
    return api_key


def api_key_authenticate(*, raw_key: str) -> ApiKey:
    """The usable key whose full text is ``raw_key``, with its tenant loaded; else ``errors.InvalidApiKey``.

    Unknown, malformed, revoked and expired keys all fail with the same message, so a
    caller learns nothing about which keys exist. The key's tenant is the row's: a key
    can only ever act for the tenant that created it. The row may come from this
    process's cache (``_ApiKeyCache`` says how stale it can be); usability is checked on
    every call.
    """
    if not isinstance(raw_key, str) or not _API_KEY_RE.fullmatch(raw_key):
        raise errors.InvalidApiKey()
    key_hash = _api_key_hash(raw_key)
    api_key, generation = api_key_cache.get(key_hash, settings.TANDEM_API_KEY_CACHE_TTL_S)
    if api_key is None:
        try:
            api_key = ApiKey.objects.select_related("tenant").get(key_hash=key_hash)
        except ApiKey.DoesNotExist:
            raise errors.InvalidApiKey() from None
        api_key_cache.put(key_hash, api_key, generation)
    now = timezone.now()
    if not api_key.is_usable_at(now):
        raise errors.InvalidApiKey()
    stale_before = now - LAST_USED_RESOLUTION
    if api_key.last_used_at is None or api_key.last_used_at <= stale_before:
        # Conditional, so a burst of concurrent requests writes once, not once each.
        ApiKey.objects.filter(pk=api_key.pk).exclude(last_used_at__gt=stale_before).update(last_used_at=now)
        api_key.last_used_at = now
        api_key_cache.put(key_hash, api_key, generation)  # so the next minute's uses write nothing
    return api_key


# --- budgets ----------------------------------------------------------------------------


def _as_money(value: Any, what: str, *, nullable: bool = False) -> Decimal | None:
    """``value`` as a non-negative Decimal. Floats are refused: they are how money goes wrong."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str)):
        raise errors.InvalidInput(f"{what} must be a Decimal, an int or a decimal string, not {type(value).__name__}")
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise errors.InvalidInput(f"{what} is not a number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise errors.InvalidInput(f"{what} must be a finite amount >= 0, got {value!r}")
    return amount


def _fmt(amount: Decimal) -> str:
    """An amount for people: no trailing zeros, never scientific notation."""
    text = format(amount.normalize(), "f")
    return text if text != "-0" else "0"


@transaction.atomic
def budget_set(
    *,
    tenant: Tenant,
    period: str,
    hard_limit: Decimal | None,
    soft_limit: Decimal | None,
    api_key: ApiKey | None = None,
    by: User | None = None,
) -> Budget:
    """Create or change the tenant's (or one key's) budget for ``period``. Only the limits change: counters stay.

    ``by`` must be an owner or admin of the tenant; ``None`` is for system callers (the
    Django admin, management commands).
    """
    if by is not None and not _membership_of(by, tenant.pk).can_manage:
        raise errors.PermissionDenied("only owners and admins can set budgets")
    if period not in Budget.Period.values:
        raise errors.InvalidInput(f"unknown period {period!r}: one of {', '.join(Budget.Period.values)}")
    if api_key is not None and api_key.tenant_id != tenant.pk:
        raise errors.InvalidInput("that API key belongs to another tenant")
    hard = _as_money(hard_limit, "hard_limit", nullable=True)
    soft = _as_money(soft_limit, "soft_limit", nullable=True)
    if hard is not None and soft is not None and soft > hard:
        raise errors.InvalidInput(f"the soft limit ({_fmt(soft)}) is above the hard limit ({_fmt(hard)})")
    # Only the limits are written (update_fields), so counters a concurrent request moved
    # are never overwritten; the row lock orders this change with the money paths.
    budget, created = Budget.objects.select_for_update().get_or_create(
        tenant=tenant,
        api_key=api_key,
        period=period,
        defaults={"period_start": Budget(period=period).current_period_start(timezone.now())},
    )
    before: dict[str, Any] = {} if created else {"hard_limit": budget.hard_limit, "soft_limit": budget.soft_limit}
    after: dict[str, Any] = {"hard_limit": hard, "soft_limit": soft}
    if created:
        after = {"period": period, "api_key": api_key.prefix if api_key is not None else None, **after}
    changes = audit_changes(before=before, after=after)
    if changes:
        audit_event_record(action=AuditEvent.Action.BUDGET_SET, by=by, tenant=tenant, obj=budget, changes=changes)
    budget.hard_limit = hard
    budget.soft_limit = soft
    budget.save(update_fields=["hard_limit", "soft_limit"])
    return budget


def _budgets_lock(budget_ids: Iterable[int]) -> list[Budget]:
    # Every path that moves money locks its budgets in id order, so two requests that
    # share budgets (the tenant's and a key's) queue instead of deadlocking.
    # ``budget_ids`` may be a queryset: it becomes a subquery of this one statement, not a
    # query of its own (one round trip less on every reservation and settlement).
    return list(Budget.objects.select_for_update().filter(id__in=budget_ids).order_by("id"))


def _budget_roll_over(budget: Budget, now: datetime) -> None:
    """Start the current period if the counters still count an earlier one.

    ``spent`` starts again from zero, the soft alert may fire again; ``reserved`` carries
    over, because that money is still held by requests in flight: they will settle or
    release it from this period's counters.
    """
    if budget.is_stale_at(now):
        budget.period_start = budget.current_period_start(now)
        budget.spent = Decimal(0)
        budget.soft_alerted_at = None


def _budget_refusal(budget: Budget, amount: Decimal) -> errors.BudgetExceeded | None:
    if budget.hard_limit is None or budget.spent + budget.reserved + amount <= budget.hard_limit:
        return None
    left = max(budget.hard_limit - budget.spent - budget.reserved, Decimal(0))
    return errors.BudgetExceeded(
        f"this request would exceed the {budget.scope_label} {budget.period} budget: hard limit "
        f"{_fmt(budget.hard_limit)}, {_fmt(left)} left, and the request may cost up to {_fmt(amount)}",
        budget_id=budget.pk,
        limit=budget.hard_limit,
        left=left,
        requested=amount,
        may_fit_later=budget.reserved > 0 and budget.hard_limit - budget.spent >= amount,
    )


@transaction.atomic
def budget_reserve(
    *,
    tenant: Tenant,
    api_key: ApiKey | None,
    amount: Decimal,
    request_id: str,
    price: Price | None = None,
) -> Reservation:
    """Hold ``amount`` (the request's worst case) on every budget that applies, or refuse with ``BudgetExceeded``.

    The budgets that apply are the tenant's (api_key empty) and, for a key, the key's.
    No budget means no limit. ``price`` (the one ``amount`` was estimated from) pins its
    book for the settlement; without it the book active now is pinned.
    """
    if api_key is not None and api_key.tenant_id != tenant.pk:
        # Never let one tenant's key draw on (or be limited by) another tenant's budgets.
        raise errors.InvalidInput("that API key belongs to another tenant")
    if not request_id:
        raise errors.InvalidInput("a reservation needs a request id")
    money = _as_money(amount, "amount")
    assert money is not None
    # Round up: a reservation may hold a nano-unit more than asked, never less.
    money = money.quantize(MONEY_QUANTUM, ROUND_UP)
    now = timezone.now()

    # select_for_update makes the check and the increment one step per budget: any other
    # reservation, settlement or release on these budgets waits here until this
    # transaction commits, and then sees its counters. (On SQLite, whose atomic blocks
    # start with BEGIN IMMEDIATE in our settings, the whole database is that lock.)
    applicable = Budget.objects.filter(tenant=tenant, api_key__isnull=True)
    if api_key is not None:
        applicable = applicable | Budget.objects.filter(tenant=tenant, api_key=api_key)
    budgets = _budgets_lock(applicable.values_list("id", flat=True))
    for budget in budgets:
        _budget_roll_over(budget, now)
    for budget in budgets:
        refusal = _budget_refusal(budget, money)
        if refusal is not None:
            # Raising rolls the transaction back: nothing is reserved anywhere.
            logger.info("budget refused", extra={"request_id": request_id, "budget_id": budget.pk})
            raise refusal
    for budget in budgets:
        budget.reserved += money
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])

    if price is not None:
        book_id = price.book_id
    else:
        book_id = PriceBook.objects.filter(is_active=True).values_list("id", flat=True).first()
    try:
        with transaction.atomic():
            reservation = Reservation.objects.create(
                tenant=tenant, api_key=api_key, request_id=request_id, amount=money, price_book_id=book_id
            )
    except IntegrityError:
        raise errors.InvalidInput(f"the request id {request_id!r} already has a reservation") from None
    # the rows of a new reservation: plain inserts (``budgets.set`` would read them first)
    Reservation.budgets.through.objects.bulk_create(
        [Reservation.budgets.through(reservation_id=reservation.pk, budget_id=b.pk) for b in budgets]
    )
    return reservation


def _reservation_lock_held(reservation: Reservation) -> Reservation:
    locked = Reservation.objects.select_for_update().get(pk=reservation.pk)
    if locked.status != Reservation.Status.HELD:
        raise errors.AlreadySettled(f"the reservation for request {locked.request_id!r} is already {locked.status}")
    return locked


@transaction.atomic
def reservation_extend(*, reservation: Reservation, amount: Decimal) -> Reservation:
    """Hold ``amount`` more on the reservation's budgets (a request moving to a dearer tier), or refuse.

    The same locks and hard-limit check as ``budget_reserve``: a refusal
    (``BudgetExceeded``) holds nothing more and leaves the reservation as it was.
    """
    money = _as_money(amount, "amount")
    assert money is not None
    money = money.quantize(MONEY_QUANTUM, ROUND_UP)
    locked = _reservation_lock_held(reservation)
    now = timezone.now()
    budgets = _budgets_lock(locked.budgets.values_list("id", flat=True))
    for budget in budgets:
        _budget_roll_over(budget, now)
    for budget in budgets:
        refusal = _budget_refusal(budget, money)
        if refusal is not None:
            logger.info("budget refused an extension", extra={"request_id": locked.request_id, "budget_id": budget.pk})
            raise refusal
    for budget in budgets:
        budget.reserved += money
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])
    locked.amount += money
    locked.save(update_fields=["amount"])
    reservation.amount = locked.amount
    return reservation


@transaction.atomic
def reservation_release(*, reservation: Reservation) -> None:
    """Give back everything the reservation holds: nothing was produced, so no charge and no ledger row."""
    # The reservation first, then its budgets in id order: the same order as usage_settle.
    locked = _reservation_lock_held(reservation)
    now = timezone.now()
    for budget in _budgets_lock(locked.budgets.values_list("id", flat=True)):
        _budget_roll_over(budget, now)
        budget.reserved -= locked.amount
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])
    locked.status = Reservation.Status.RELEASED
    locked.settled_at = now
    locked.save(update_fields=["status", "settled_at"])
    reservation.status, reservation.settled_at = locked.status, locked.settled_at


def reservations_release_stale(*, older_than: datetime) -> int:
    """Release every reservation still held that was made before ``older_than``; return how many.

    A request settles or releases its reservation when it ends, even when it fails; only
    a process that died mid-request leaves one held, and that money would stay out of its
    budget forever. Each release is its own transaction, and one that a late settlement
    beat to it is skipped (``AlreadySettled``), so this never charges or frees twice.
    """
    released = 0
    stale = Reservation.objects.filter(status=Reservation.Status.HELD, created_at__lt=older_than)
    for reservation in stale.only("pk").iterator():
        try:
            reservation_release(reservation=reservation)
        except errors.AlreadySettled:
            continue
        logger.warning("released a stale reservation", extra={"reservation_id": str(reservation.pk)})
        released += 1
    # Budget leases too: a live process returns its leases within TANDEM_LEASE_TTL_S (plus
    # its longest stream), so one still active this long belongs to a process that died.
    # What its requests had settled stays charged; only the unused part comes back.
    stale_leases = BudgetLease.objects.filter(status=BudgetLease.Status.ACTIVE, created_at__lt=older_than)
    for lease in stale_leases.only("pk").iterator():
        try:
            budget_lease_close(lease=lease)
        except errors.AlreadySettled:
            continue
        logger.warning("closed a stale budget lease", extra={"lease_id": str(lease.pk)})
        released += 1
    return released


# --- prices and costs -------------------------------------------------------------------


def _as_count(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise errors.InvalidInput(f"{what} must be an int or a Decimal, not {type(value).__name__}")
    count = Decimal(value)
    if not count.is_finite() or count < 0:
        raise errors.InvalidInput(f"{what} must be >= 0, got {value!r}")
    return count


def cost_compute(
    *, price: Price, prompt_tokens: int, completion_tokens: int, drafted_tokens: Decimal, gpu_ms: Decimal
) -> CostBreakdown:
    """THE cost function: what these counts cost at this price. Both the reservation and the charge use it.

    - prompt and completion tokens at the tier's token rates, booked to the tier's own
      bucket (edge -> edge, speculative -> verifier, cloud -> cloud);
    - drafted tokens at the draft rate -> edge;
    - verifier GPU milliseconds at the GPU hourly rate -> verifier;
    - each bucket quantized to 1e-9 (ROUND_HALF_UP); the total is the sum of the buckets.

    Every step is non-decreasing in every count, so more of anything never costs less:
    the bound ``cost_estimate_max`` relies on that.
    """
    prompt = _as_count(prompt_tokens, "prompt_tokens")
    completion = _as_count(completion_tokens, "completion_tokens")
    drafted = _as_count(drafted_tokens, "drafted_tokens")
    gpu = _as_count(gpu_ms, "gpu_ms")
    with localcontext() as ctx:
        ctx.prec = _COST_PRECISION
        buckets = {
            "edge": drafted * price.draft_per_mtok / TOKENS_PER_MTOK,
            "verifier": gpu * price.gpu_per_hour / MS_PER_HOUR,
            "cloud": Decimal(0),
        }
        buckets[_TIER_BUCKET[Tier(price.tier)]] += (
            prompt * price.prompt_per_mtok + completion * price.completion_per_mtok
        ) / TOKENS_PER_MTOK
        rounded = {k: v.quantize(MONEY_QUANTUM, ROUND_HALF_UP) for k, v in buckets.items()}
    return CostBreakdown(**rounded)


def cost_estimate_max(
    *, price: Price, prompt_tokens: int, max_tokens: int, gpu_ms_per_token: Decimal | None = None
) -> Decimal:
    """The most a request can cost: what ``budget_reserve`` holds. ``cost_compute`` at the worst counts.

    Worst counts: ``max_tokens`` completion tokens, ``MAX_DRAFT_TOKENS`` drafted per
    completion token, and the GPU cap per token over prompt and completion. A settlement
    charges ``cost_compute`` at counts no higher than these (``usage_cost``), so it can
    never cost more. ``gpu_ms_per_token`` (at most the price's cap) holds a tighter GPU
    time instead, from what this model was measured to take: a settlement never charges
    more than was held (``settlement_cost``), so a rare slower request is charged the held
    amount, and a hard budget is still never passed.
    """
    cap = price.max_gpu_ms_per_token if gpu_ms_per_token is None else min(gpu_ms_per_token, price.max_gpu_ms_per_token)
    return cost_compute(
        price=price,
        prompt_tokens=prompt_tokens,
        completion_tokens=max_tokens,
        drafted_tokens=Decimal(MAX_DRAFT_TOKENS * max_tokens),
        gpu_ms=cap * (prompt_tokens + max_tokens),
    ).total


@dataclass(frozen=True)
class _CacheRates:
    """A price as a replay from a cache pays it: the cache rate for prompt and completion tokens, nothing else."""

    model: str
    tier: str
    prompt_per_mtok: Decimal
    completion_per_mtok: Decimal
    draft_per_mtok: Decimal = Decimal(0)
    gpu_per_hour: Decimal = Decimal(0)
    max_gpu_ms_per_token: Decimal = Decimal(0)

    @classmethod
    def of(cls, price: Price) -> _CacheRates:
        return cls(price.model, price.tier, price.cache_per_mtok, price.cache_per_mtok)


def cache_cost(*, price: Price, prompt_tokens: int, completion_tokens: int) -> CostBreakdown:
    """A replay from a cache: its tokens at the tier's cache rate, nothing for drafts or GPU time."""
    return cost_compute(
        price=_CacheRates.of(price),  # type: ignore[arg-type]  # read for its rates only
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        drafted_tokens=Decimal(0),
        gpu_ms=Decimal(0),
    )


def cache_cost_max(*, price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """The most a replay from a cache can cost (what it holds): ``max_tokens`` at the tier's cache rate."""
    return cache_cost(price=price, prompt_tokens=prompt_tokens, completion_tokens=max_tokens).total


def generation_cost(
    *, price: Price, prompt_tokens: int, completion_tokens: int, drafted_tokens: Decimal, gpu_ms: Decimal
) -> CostBreakdown:
    """What generating these counts costs: ``cost_compute`` with GPU time capped.

    GPU time is charged up to ``max_gpu_ms_per_token`` per prompt and completion token,
    the same cap ``cost_estimate_max`` reserved for; the ledger keeps the measured time.
    """
    drafted = _as_count(drafted_tokens, "drafted_tokens").quantize(COUNT_QUANTUM, ROUND_HALF_UP)
    gpu = _as_count(gpu_ms, "gpu_ms").quantize(COUNT_QUANTUM, ROUND_HALF_UP)
    gpu_cap = price.max_gpu_ms_per_token * (prompt_tokens + completion_tokens)
    return cost_compute(
        price=price,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        drafted_tokens=drafted,
        gpu_ms=min(gpu, gpu_cap),
    )


def usage_cost(*, price: Price, usage: Usage) -> CostBreakdown:
    """What a settlement charges for ``usage``: its generation (``generation_cost``), or a cache's replay of one
    (``cache_cost``); a batch job's at the price's batch discount (``batch_discounted``)."""
    if usage.source != UsageSource.GENERATION:
        cost = cache_cost(price=price, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    else:
        cost = generation_cost(
            price=price,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            drafted_tokens=usage.drafted_tokens,
            gpu_ms=usage.gpu_ms,
        )
    return batch_discounted(cost, price) if usage.latency_class == "batch" else cost


def batch_discounted(cost: CostBreakdown, price: Price) -> CostBreakdown:
    """THE batch discount: every bucket times (1 - ``price.batch_discount`` / 100), rounded half up to 1e-9.

    Never more than ``cost`` (the discount is 0 to 100 percent), so what a request's hold
    covers at the full price still bounds what it is charged, and a hard budget holds.
    """
    discount = getattr(price, "batch_discount", Decimal(0)) or Decimal(0)  # a cache's rates carry none
    if not discount:
        return cost
    with localcontext() as ctx:
        ctx.prec = _COST_PRECISION
        keep = (Decimal(100) - discount) / Decimal(100)
        edge, verifier, cloud = ((b * keep).quantize(MONEY_QUANTUM, ROUND_HALF_UP) for b in cost._buckets())
    return CostBreakdown(edge=edge, verifier=verifier, cloud=cloud)


def settlement_cost(*, price: Price, usage: Usage, held: Decimal) -> CostBreakdown:
    """What settling ``usage`` against ``held`` (its reservation's amount) charges: THE settlement figure.

    ``usage_cost``, capped at what was held. The gateway calls this in memory to put the
    exact cost in the final frame before the ledger row is written (write-behind), and
    ``usage_settle`` calls it again to write the row: same inputs, same function, so the
    client's figure and the ledger's are the same Decimal.
    """
    cost = usage_cost(price=price, usage=usage)
    if cost.total > held:
        # Holds count GPU time at the model's measured pace (inference.holds.GpuPace), not the
        # price's ceiling: a request slower than the slowest of late is charged what was held.
        # The hard limit wins over the ledger either way.
        logger.info(
            "settlement above its hold: charging what was held",
            extra={"request_id": usage.request_id, "cost": str(cost.total), "reserved": str(held)},
        )
        cost = cost.capped_at(held)
    return cost


def settlement_costs(*, legs: list[tuple[Price, Usage]], held: Decimal) -> list[CostBreakdown]:
    """What settling the legs of one request against ``held`` charges, leg by leg: THE figures for several legs.

    Each leg is ``settlement_cost`` against what the legs before it left of ``held``, so
    their sum never exceeds what was held, and a one-leg request costs exactly what
    ``settlement_cost`` says.
    """
    costs = []
    left = held
    for price, usage in legs:
        cost = settlement_cost(price=price, usage=usage, held=left)
        costs.append(cost)
        left -= cost.total
    return costs


def _price_for_settlement(reservation: Reservation, usage: Usage, price: Price | None = None) -> Price:
    # The book pinned at reservation time, for the tier that actually served (a failover
    # may differ from the planned one); the active book only if none was active then.
    # A caller that already holds that price (the gateway pins it in memory) saves the
    # lookup; one of another book, model or tier is ignored, never trusted.
    book_id = reservation.price_book_id
    if (
        price is not None
        and book_id is not None
        and price.book_id == book_id
        and (price.model, price.tier) == (usage.model, usage.route_tier)
    ):
        return price
    if book_id is None:
        active = PriceBook.objects.filter(is_active=True).values_list("id", flat=True).first()
        if active is None:
            raise errors.PriceNotFound("no price book is active")
        book_id = active
    try:
        return Price.objects.select_related("book").get(book_id=book_id, model=usage.model, tier=usage.route_tier)
    except Price.DoesNotExist:
        raise errors.PriceNotFound(f"no price for {usage.model!r} on the {usage.route_tier} tier") from None


@transaction.atomic
def price_book_publish(*, version: int, prices: list[dict], note: str = "", by: User | None = None) -> PriceBook:
    """A new price book with ``prices``, made the only active one, in one step (readers see the old or the new).

    Each price is a dict with ``model``, ``tier``, ``prompt_per_mtok``,
    ``completion_per_mtok`` and optionally ``draft_per_mtok``, ``gpu_per_hour``,
    ``max_gpu_ms_per_token`` (default 0); rates are Decimals, ints or decimal strings.
    Versions only go up: a book is never edited, a new one replaces it. ``by`` is who
    published it, for the audit log (None: the system); callers check that it is an operator.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise errors.InvalidInput(f"a price book version is a positive int, got {version!r}")
    latest = PriceBook.objects.aggregate(latest=Max("version"))["latest"]
    if latest is not None and version <= latest:
        raise errors.InvalidInput(f"price book versions only go up: v{latest} exists, got v{version}")
    if not prices:
        raise errors.InvalidInput("a price book needs at least one price")
    rows = [_price_row(entry) for entry in prices]
    keys = [(row["model"], row["tier"]) for row in rows]
    if len(set(keys)) != len(keys):
        raise errors.InvalidInput("a price book has one price per model and tier")

    # Locking the active book serializes publishers; the partial unique constraint on
    # is_active is what guarantees there is never more than one active book.
    previous = PriceBook.objects.select_for_update().filter(is_active=True).first()
    PriceBook.objects.filter(is_active=True).update(is_active=False)
    try:
        with transaction.atomic():
            book = PriceBook.objects.create(version=version, note=note, is_active=True)
    except IntegrityError:
        raise errors.InvalidInput(f"price book v{version} was published concurrently; publish again") from None
    Price.objects.bulk_create([Price(book=book, **row) for row in rows])
    audit_event_record(
        action=AuditEvent.Action.PRICE_BOOK_PUBLISH,
        by=by,
        tenant=None,
        obj=book,
        changes=audit_changes(
            before={} if previous is None else {"version": previous.version, "prices": previous.prices.count()},
            after={"version": version, "prices": len(rows), "note": note},
        ),
    )
    # This process sees the new book at once (and again once it commits, so a lookup that
    # raced the publish cannot keep the old one); other processes within their cache TTL.
    selectors.price_cache.forget()
    transaction.on_commit(selectors.price_cache.forget)
    logger.info("price book published", extra={"version": version, "prices": len(rows)})
    return book


@transaction.atomic
def price_book_amend(*, prices: list[dict], note: str = "", by: User | None = None) -> PriceBook | None:
    """Publish the next book: the active book's prices, with ``prices`` added or replacing theirs (same model and tier).

    Returns None, publishing nothing, when every price given is already active as given.
    """
    active = PriceBook.objects.select_for_update().filter(is_active=True).first()
    current = {} if active is None else {(p.model, p.tier): p for p in active.prices.all()}
    rows = [_price_row(entry) for entry in prices]
    if all((old := current.get((r["model"], r["tier"]))) and all(getattr(old, k) == r[k] for k in r) for r in rows):
        return None
    replaced = {(r["model"], r["tier"]) for r in rows}
    keep = [price_as_dict(p) for key, p in current.items() if key not in replaced]
    latest = PriceBook.objects.aggregate(latest=Max("version"))["latest"] or 0
    return price_book_publish(version=latest + 1, prices=keep + rows, note=note, by=by)


def price_as_dict(price: Price) -> dict[str, Any]:
    """A published price as ``price_book_publish`` takes it (to carry it into the next book)."""
    return {"model": price.model, "tier": price.tier, **{rate: getattr(price, rate) for rate in PRICE_RATES}}


def _price_row(entry: dict) -> dict[str, Any]:
    unknown = set(entry) - set(_PRICE_REQUIRED) - set(PRICE_RATES)
    if unknown:
        # A misspelt rate would otherwise default to 0: a model served for free.
        raise errors.InvalidInput(f"unknown price fields {sorted(unknown)}")
    missing = [k for k in _PRICE_REQUIRED if k not in entry]
    if missing:
        raise errors.InvalidInput(f"a price needs {missing}")
    if entry["tier"] not in TIER_VALUES:
        raise errors.InvalidInput(f"unknown tier {entry['tier']!r}: one of {', '.join(TIER_VALUES)}")
    if not isinstance(entry["model"], str) or not entry["model"]:
        raise errors.InvalidInput("a price needs a model name")
    row: dict[str, Any] = {"model": entry["model"], "tier": entry["tier"]}
    for rate in PRICE_RATES:
        value = _as_money(entry.get(rate, 0), f"{entry['model']}/{entry['tier']} {rate}")
        assert value is not None
        if value != value.quantize(MONEY_QUANTUM):
            raise errors.InvalidInput(f"{rate} has more than 9 decimal places: {value}")
        row[rate] = value
    if row["batch_discount"] > 100:
        raise errors.InvalidInput(f"{entry['model']}/{entry['tier']}: batch_discount is a percentage, 0 to 100")
    if row["gpu_per_hour"] > 0 and row["max_gpu_ms_per_token"] == 0:
        # A GPU rate with no cap would charge nothing for GPU time, ever.
        raise errors.InvalidInput(f"{entry['model']}/{entry['tier']}: a GPU rate needs max_gpu_ms_per_token > 0")
    return row


# --- settlement -------------------------------------------------------------------------


_TIERS = frozenset(TIER_VALUES)
_OUTCOMES = frozenset(UsageRecord.Outcome.values)
_FINISH_REASONS = frozenset(UsageRecord.FinishReason.values)


def _usage_validate(usage: Usage) -> None:
    if usage.route_tier not in _TIERS:
        raise errors.InvalidInput(f"unknown tier {usage.route_tier!r}")
    if usage.outcome not in _OUTCOMES:
        raise errors.InvalidInput(f"unknown outcome {usage.outcome!r}")
    if usage.finish_reason not in _FINISH_REASONS:
        raise errors.InvalidInput(f"unknown finish reason {usage.finish_reason!r}")
    for name in ("prompt_tokens", "completion_tokens", "accepted_tokens"):
        value = getattr(usage, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise errors.InvalidInput(f"{name} must be an int >= 0, got {value!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in usage.tags.items()):
        raise errors.InvalidInput("tags map strings to strings")


@transaction.atomic
def usage_settle(*, reservation: Reservation, usage: Usage, price: Price | None = None) -> UsageRecord:
    """Charge what the request used, free the rest of its reservation, and write its ledger row; once.

    A second settlement (or a settlement after a release) raises ``errors.AlreadySettled``:
    the reservation row is locked and its status checked inside this transaction, so two
    concurrent calls cannot both see it held.
    """
    return usage_settle_legs(reservation=reservation, legs=[(usage, price)])[0]


@transaction.atomic
def usage_settle_legs(*, reservation: Reservation, legs: list[tuple[Usage, Price | None]]) -> list[UsageRecord]:
    """``usage_settle`` for a request served by several tiers in turn: one ledger row per leg, in one commit.

    Leg 0 is the request's own id; every leg names it in ``leg_of``. The legs are charged
    in order against what the reservation holds (``settlement_costs``): their sum never
    exceeds it.
    """
    if not legs:
        raise errors.InvalidInput("a settlement needs at least one leg")
    for index, (usage, _) in enumerate(legs):
        _usage_validate(usage)
        owner = usage.leg_of or usage.request_id
        if owner != reservation.request_id or usage.leg != index or (index == 0) != (usage.request_id == owner):
            raise errors.InvalidInput(
                f"usage for request {usage.request_id!r} (leg {usage.leg} of {owner!r}) cannot settle leg {index} "
                f"of the reservation of {reservation.request_id!r}"
            )
    # The reservation first, then its budgets in id order; budget_reserve locks budgets
    # only, so no two money paths can wait on each other in a cycle.
    locked = _reservation_lock_held(reservation)
    budgets = _budgets_lock(locked.budgets.values_list("id", flat=True))
    priced = [(_price_for_settlement(locked, usage, price), usage) for usage, price in legs]
    costs = settlement_costs(legs=priced, held=locked.amount)
    total = sum((cost.total for cost in costs), Decimal(0))
    now = timezone.now()

    for budget in budgets:
        _budget_roll_over(budget, now)
        budget.reserved -= locked.amount
        budget.spent += total
        if budget.soft_limit is not None and budget.soft_alerted_at is None and budget.spent >= budget.soft_limit:
            budget.soft_alerted_at = now
            _soft_alert_on_commit(budget, reservation.request_id)
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])

    records = [
        UsageRecord.objects.create(
            **_usage_fields(usage, price, cost),
            tenant_id=locked.tenant_id,
            api_key_id=locked.api_key_id,
            reservation=locked,
        )
        for (price, usage), cost in zip(priced, costs, strict=True)
    ]
    locked.status = Reservation.Status.SETTLED
    locked.settled_at = now
    locked.save(update_fields=["status", "settled_at"])
    reservation.status, reservation.settled_at = locked.status, locked.settled_at
    return records


def _soft_alert_on_commit(budget: Budget, request_id: str) -> None:
    # After commit: soft_alerted_at is what makes the alert once per period, so the
    # alert goes out only if that mark is saved (a rolled-back settlement alerts nothing).
    message = (
        f"soft limit reached: the {budget.scope_label} {budget.period} budget of tenant {budget.tenant_id} "
        f"has spent {_fmt(budget.spent)} of a soft limit of {_fmt(budget.soft_limit or Decimal(0))}"
    )
    extra = {"request_id": request_id, "tenant_id": budget.tenant_id, "budget_id": budget.pk}
    transaction.on_commit(lambda: logger.warning(message, extra=extra))


# --- budget leases ------------------------------------------------------------------------
#
# A process holds a slice of a tenant's budgets (a lease) and admits requests against it
# in memory (``tenants.leases``), so a request needs no database round trip to be paid
# for. The proof that no hard budget is overspent is the reservation's, one level up:
# - opening a lease is a reservation of ``amount`` on every applicable budget, under the
#   same row locks and the same check (``spent + reserved + amount <= hard_limit``);
# - the process admits a request only while the worst cases in flight plus the costs
#   already settled fit in ``amount``, and a settlement never exceeds its worst case;
# - each batch settlement moves exactly its cost from ``reserved`` to ``spent`` and adds
#   it to ``charged`` (kept <= ``amount`` by a constraint), and closing gives back
#   ``amount - charged``. So for every budget, at every commit,
#   ``spent + reserved`` = what was settled + what reservations and leases may still
#   spend, which the opening checks kept within the hard limit.


@dataclass(frozen=True)
class LeaseCharge:
    """One request to settle against a lease: what it used, the price it was admitted at, and its worst case."""

    usage: Usage
    price: Price
    # the worst case the request was admitted with (cost_estimate_max at ``price``); for a
    # later leg of a request, what the legs before it left of that
    held: Decimal


def _applicable_budgets(tenant_id: int, api_key_id: int | None):
    applicable = Budget.objects.filter(tenant_id=tenant_id, api_key__isnull=True)
    if api_key_id is not None:
        applicable = applicable | Budget.objects.filter(tenant_id=tenant_id, api_key_id=api_key_id)
    return applicable.values_list("id", flat=True)


@transaction.atomic
def budget_lease_open(
    *,
    tenant: Tenant,
    api_key: ApiKey | None,
    amount: Decimal,
    min_amount: Decimal,
    headroom_share: Decimal,
    holder: str = "",
) -> BudgetLease | None:
    """Hold up to ``amount`` on every applicable budget for one process to admit requests against; None if it cannot.

    The lease holds ``amount``, or less where a hard limit is near: never more than
    ``headroom_share`` of what the tightest budget has left (so several processes can
    hold leases on one budget, each leaving room for the others). If that is less than
    ``min_amount`` the budget is too near its limit for a lease: nothing is held and the
    caller reserves per request instead, which refuses exactly at the limit.
    """
    if api_key is not None and api_key.tenant_id != tenant.pk:
        raise errors.InvalidInput("that API key belongs to another tenant")
    wanted = _as_money(amount, "amount")
    least = _as_money(min_amount, "min_amount")
    assert wanted is not None and least is not None
    now = timezone.now()
    budgets = _budgets_lock(_applicable_budgets(tenant.pk, api_key.pk if api_key is not None else None))
    for budget in budgets:
        _budget_roll_over(budget, now)
    held = wanted
    for budget in budgets:
        if budget.hard_limit is not None:
            left = budget.hard_limit - budget.spent - budget.reserved
            held = min(held, left * headroom_share)
    # Round down: a lease may hold a nano-unit less than the share, never more.
    held = held.quantize(MONEY_QUANTUM, ROUND_DOWN)
    if held < least or (held <= 0 and wanted > 0):
        return None  # (a lease of 0 is fine for requests that cost nothing: free models)
    for budget in budgets:
        assert _budget_refusal(budget, held) is None  # held <= share of what is left
        budget.reserved += held
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])
    lease = BudgetLease.objects.create(tenant=tenant, api_key=api_key, amount=held, holder=holder[:200])
    BudgetLease.budgets.through.objects.bulk_create(
        [BudgetLease.budgets.through(budgetlease_id=lease.pk, budget_id=b.pk) for b in budgets]
    )
    return lease


def _lease_lock_active(lease: BudgetLease) -> BudgetLease:
    locked = BudgetLease.objects.select_for_update().get(pk=lease.pk)
    if locked.status != BudgetLease.Status.ACTIVE:
        raise errors.AlreadySettled(f"the budget lease {locked.pk} is already {locked.status}")
    return locked


@transaction.atomic
def budget_lease_settle(*, lease: BudgetLease, charges: list[LeaseCharge]) -> None:
    """Charge a batch of requests admitted against ``lease``, each exactly, and write their ledger rows; in one commit.

    Each request's cost is ``settlement_cost`` at the price and worst case it was
    admitted with: the figure the gateway already sent to the client. The batch's total
    moves from the budgets' ``reserved`` to their ``spent``. A batch that would take the
    lease past its amount is refused whole (``InvalidInput``): the in-memory admission
    makes that impossible, so it would be a bug, and charging past a lease could overspend.
    """
    if not charges:
        return
    costs = []
    for charge in charges:
        _usage_validate(charge.usage)
        if charge.price.book_id is None:
            raise errors.InvalidInput("a lease charge needs a stored price")
        costs.append(settlement_cost(price=charge.price, usage=charge.usage, held=charge.held))
    total = sum((cost.total for cost in costs), Decimal(0))
    # The lease first, then its budgets in id order (as usage_settle: reservation, then budgets).
    locked = _lease_lock_active(lease)
    if locked.charged + total > locked.amount:
        raise errors.InvalidInput(
            f"a batch of {_fmt(total)} would take lease {locked.pk} past its amount "
            f"({_fmt(locked.charged)} of {_fmt(locked.amount)} charged)"
        )
    now = timezone.now()
    for budget in _budgets_lock(locked.budgets.values_list("id", flat=True)):
        _budget_roll_over(budget, now)
        budget.reserved -= total
        budget.spent += total
        if budget.soft_limit is not None and budget.soft_alerted_at is None and budget.spent >= budget.soft_limit:
            budget.soft_alerted_at = now
            _soft_alert_on_commit(budget, charges[-1].usage.request_id)
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])
    locked.charged += total
    locked.save(update_fields=["charged"])
    lease.charged = locked.charged
    rows_insert(
        model=UsageRecord,
        rows=[
            _usage_row(charge.usage, charge.price, cost, locked, now)
            for charge, cost in zip(charges, costs, strict=True)
        ],
    )


def rows_insert(*, model: type[Model], rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts of every concrete field's attname, the auto id aside) in one ``executemany``.

    What ``bulk_create`` does, less its cost per object (a model instance, pre-save hooks,
    the SQL compiled again for every batch), which was most of a lease batch's time and,
    on a 2-core server, time taken from the requests in flight. Each value still goes
    through its field's ``get_db_prep_save``, as ``bulk_create`` does, so every backend
    stores exactly what the ORM would; database constraints check every row the same.
    """
    if not rows:
        return
    conn = connections[router.db_for_write(model)]  # the connection itself: the proxy costs a lookup per use
    fields = [f for f in model._meta.concrete_fields if not f.primary_key or f.attname in rows[0]]
    columns = ", ".join(conn.ops.quote_name(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {conn.ops.quote_name(model._meta.db_table)} ({columns}) VALUES ({marks})"
    # A batch repeats many values (its tenant, lease, time, model...): each distinct value
    # of a field is prepared once.
    prepared: dict[tuple[str, type, Any], Any] = {}

    def prep(f: Any, value: Any) -> Any:
        try:
            key = (f.attname, type(value), value)
            if key in prepared:
                return prepared[key]
        except TypeError:  # unhashable (a JSON dict): prepared every time
            return f.get_db_prep_save(value, conn)
        prepared[key] = result = f.get_db_prep_save(value, conn)
        return result

    params = [[prep(f, row[f.attname]) for f in fields] for row in rows]
    with conn.cursor() as cursor:
        cursor.executemany(sql, params)


def _usage_row(usage: Usage, price: Price, cost: CostBreakdown, lease: BudgetLease, now: datetime) -> dict[str, Any]:
    return {
        **_usage_fields(usage, price, cost),
        "tenant_id": lease.tenant_id,
        "api_key_id": lease.api_key_id,
        "reservation_id": None,
        "lease_id": lease.pk,
        "created_at": now,
    }


def _usage_fields(usage: Usage, price: Price, cost: CostBreakdown) -> dict[str, Any]:
    """A ledger row's fields from what the request used and what it costs (one place for both settle paths)."""
    return dict(
        request_id=usage.request_id,
        user_id=usage.user_id,
        tags=dict(usage.tags),
        leg_of=usage.leg_of or usage.request_id,
        source=usage.source,
        saving=max(usage.replayed_cost - cost.total, Decimal(0)) if usage.replayed_cost is not None else Decimal(0),
        leg=usage.leg,
        escalation=usage.escalation,
        route_tier=usage.route_tier,
        route_reason=usage.route_reason,
        policy_version=usage.policy_version,
        route_signals=dict(usage.route_signals),
        upstream=usage.upstream,
        model=usage.model,
        verifier_version=usage.verifier_version,
        draft_version=usage.draft_version,
        price_book_id=price.book_id,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        drafted_tokens=Decimal(usage.drafted_tokens).quantize(COUNT_QUANTUM, ROUND_HALF_UP),
        accepted_tokens=usage.accepted_tokens,
        draft_rejections=usage.draft_rejections,
        gpu_ms=Decimal(usage.gpu_ms).quantize(COUNT_QUANTUM, ROUND_HALF_UP),
        cost_edge=cost.edge,
        cost_verifier=cost.verifier,
        cost_cloud=cost.cloud,
        cost_total=cost.total,
        outcome=usage.outcome,
        finish_reason=usage.finish_reason,
        error=usage.error,
        ttft_ms=usage.ttft_ms,
        duration_ms=usage.duration_ms,
    )


@transaction.atomic
def budget_lease_close(*, lease: BudgetLease) -> Decimal:
    """Give back what ``lease`` holds and its requests did not spend; return that amount. Once."""
    locked = _lease_lock_active(lease)
    unused = locked.amount - locked.charged
    now = timezone.now()
    for budget in _budgets_lock(locked.budgets.values_list("id", flat=True)):
        _budget_roll_over(budget, now)
        budget.reserved -= unused
        budget.save(update_fields=["period_start", "spent", "reserved", "soft_alerted_at"])
    locked.status = BudgetLease.Status.CLOSED
    locked.closed_at = now
    locked.save(update_fields=["status", "closed_at"])
    lease.status, lease.closed_at = locked.status, locked.closed_at
    return unused
