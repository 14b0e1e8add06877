"""Reads of the tenants app: prices, memberships and invites, keys, the ledger, budgets and the audit log, always
scoped to one tenant or user (the operators' audit log aside: every tenant's, for staff only).

Selectors never write. A budget whose period has ended but that no request has touched
since is shown as the new period would start (nothing spent yet), without saving it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models
from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from tenants import errors
from tenants.models import ApiKey, AuditEvent, Budget, Invite, Membership, Price, Tenant, UsageRecord
from tenants.tiers import TIER_VALUES

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User


class _PriceCache:
    """Prices kept in this process: books never change, only which one is active does.

    ``price_in_book`` rows are kept until a publish (a book's prices are immutable);
    ``price_active`` rows for at most ``TANDEM_PRICE_CACHE_TTL_S``, so another process's
    publish is seen within that window (a publish in this process is seen at once). Money
    stays exact either way: a request pins the book of the price it was reserved with, and
    its settlement charges at that book, whichever book is active by then.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[int | None, str, str], tuple[float, Price]] = {}
        self._generation = 0
        self.clock = time.monotonic  # tests move it

    def get(self, key: tuple[int | None, str, str], ttl_s: float | None) -> tuple[Price | None, int]:
        with self._lock:
            entry = self._rows.get(key)
            generation = self._generation
        if entry is not None and (ttl_s is None or self.clock() - entry[0] < ttl_s):
            return entry[1], generation
        return None, generation

    def put(self, key: tuple[int | None, str, str], price: Price, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a book was published while this row was read
            if len(self._rows) >= self.MAX_ENTRIES:
                self._rows.clear()
            self._rows[key] = (self.clock(), price)

    def forget(self) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()


price_cache = _PriceCache()


def price_active(*, model: str, tier: str) -> Price:
    """The active price book's price for ``model`` on ``tier``; ``errors.PriceNotFound`` if it has none."""
    return _price_cached(
        (None, model, tier),
        settings.TANDEM_PRICE_CACHE_TTL_S,
        f"no active price for {model!r} on the {tier} tier",
        book__is_active=True,
        model=model,
        tier=tier,
    )


def price_active_cached(*, model: str, tier: str) -> Price | None:
    """``price_active`` when this process has it at hand (no query), else None."""
    return price_cache.get((None, model, tier), settings.TANDEM_PRICE_CACHE_TTL_S)[0]


def price_in_book(*, book_id: int, model: str, tier: str) -> Price:
    """The price for ``model`` on ``tier`` in one (immutable) book; ``errors.PriceNotFound`` if it has none."""
    return _price_cached(
        (book_id, model, tier),
        None,
        f"no price for {model!r} on the {tier} tier in this book",
        book_id=book_id,
        model=model,
        tier=tier,
    )


def _price_cached(key: tuple[int | None, str, str], ttl_s: float | None, not_found: str, **lookup: Any) -> Price:
    """The price row matching ``lookup``, from this process's cache when it holds ``key``, else read and kept."""
    price, generation = price_cache.get(key, ttl_s)
    if price is not None:
        return price
    try:
        price = Price.objects.select_related("book").get(**lookup)
    except Price.DoesNotExist:
        raise errors.PriceNotFound(not_found) from None
    price_cache.put(key, price, generation)
    return price


def memberships_for_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user_id=user.pk).select_related("tenant").order_by("tenant__name", "tenant_id")


def membership_get(*, user: User, tenant_id: int) -> Membership:
    """The user's membership in the tenant; ``errors.NotAMember`` otherwise (also when the tenant does not exist)."""
    if not user.is_authenticated:
        raise errors.NotAMember()
    try:
        return Membership.objects.select_related("tenant").get(user_id=user.pk, tenant_id=tenant_id)
    except (Membership.DoesNotExist, ValueError, TypeError):
        raise errors.NotAMember() from None


def api_keys_for_tenant(*, tenant: Tenant) -> QuerySet[ApiKey]:
    """Every key of the tenant, newest first, revoked and expired ones included (the console shows their state)."""
    return ApiKey.objects.filter(tenant=tenant).select_related("created_by").order_by("-created_at", "-id")


def usage_for_tenant(*, tenant: Tenant, limit: int = 50) -> QuerySet[UsageRecord]:
    """The tenant's latest ledger rows, newest first."""
    return UsageRecord.objects.filter(tenant=tenant).select_related("api_key").order_by("-created_at", "-id")[:limit]


def spend_by_tier(*, tenant: Tenant, since: datetime | None = None) -> dict[str, Decimal]:
    """What the tenant's requests cost, by the tier that served them; every tier is present (0 when unused)."""
    rows = UsageRecord.objects.filter(tenant=tenant)
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    spend = {tier: Decimal(0) for tier in TIER_VALUES}
    for row in rows.values("route_tier").annotate(total=Sum("cost_total")).order_by():
        spend[row["route_tier"]] = Decimal(row["total"])
    return spend


def budget_status(*, tenant: Tenant) -> list[dict[str, Any]]:
    """Each of the tenant's budgets with its limits and its current period's spent, reserved and left.

    ``left`` is what a new request may still reserve under the hard limit (never below
    0), or None without a hard limit.
    """
    now = timezone.now()
    status = []
    for budget in (
        Budget.objects.filter(tenant=tenant)
        .select_related("api_key")
        .order_by(F("api_key_id").asc(nulls_first=True), "period")
    ):
        stale = budget.is_stale_at(now)
        spent = Decimal(0) if stale else budget.spent
        left = None
        if budget.hard_limit is not None:
            left = max(budget.hard_limit - spent - budget.reserved, Decimal(0))
        status.append(
            {
                "id": budget.pk,
                "scope": budget.scope_label,
                "api_key_id": budget.api_key_id,
                "api_key_prefix": budget.api_key.prefix if budget.api_key_id else None,
                "period": budget.period,
                "period_start": budget.current_period_start(now) if stale else budget.period_start,
                "hard_limit": budget.hard_limit,
                "soft_limit": budget.soft_limit,
                "spent": spent,
                "reserved": budget.reserved,
                "left": left,
                "soft_alerted": (not stale) and budget.soft_alerted_at is not None,
            }
        )
    return status


def memberships_of_tenant(*, tenant: Tenant) -> QuerySet[Membership]:
    """The tenant's team: every membership with its user, owners first, then by username."""
    rank = {role: index for index, role in enumerate(Membership.Role.values)}
    rows = Membership.objects.filter(tenant=tenant).select_related("user")
    return rows.order_by(
        models.Case(*(models.When(role=r, then=models.Value(i)) for r, i in rank.items())), "user__username"
    )


def invites_pending(*, tenant: Tenant) -> QuerySet[Invite]:
    """The tenant's invites that can still be accepted (not used, revoked or expired), newest first."""
    return Invite.objects.filter(
        tenant=tenant, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    ).select_related("invited_by")


def invite_by_token(*, raw_token: str) -> Invite | None:
    """The invite a link's token belongs to, whatever its state (the page says why it cannot be used); else None."""
    if not isinstance(raw_token, str) or not 0 < len(raw_token) <= 100:
        return None
    return Invite.objects.select_related("tenant").filter(token_hash=Invite.hash_token(raw_token)).first()


def audit_events_for_tenant(*, tenant: Tenant, action: str = "", actor: str = "") -> QuerySet[AuditEvent]:
    """The tenant's audit events, newest first, optionally of one action and one actor (its label)."""
    return _audit_filtered(AuditEvent.objects.filter(tenant=tenant), action=action, actor=actor)


def audit_actors_for_tenant(*, tenant: Tenant) -> list[str]:
    """Who appears in the tenant's audit log (actor labels), for the page's filter."""
    labels = AuditEvent.objects.filter(tenant=tenant).values_list("actor_label", flat=True)
    return sorted(set(labels))


def tenants_all() -> QuerySet[Tenant]:
    """Every tenant by name: for operators (staff) only, e.g. the filter of every tenant's audit log."""
    return Tenant.objects.order_by("name", "pk")


AUDIT_PLATFORM = "platform"  # the operators' filter value for platform-wide events (no tenant)


def audit_events_all(*, tenant: str = "", action: str = "", actor: str = "") -> QuerySet[AuditEvent]:
    """Every tenant's audit events and the platform's, newest first: for operators (staff) only.

    ``tenant`` is a tenant's id, ``AUDIT_PLATFORM`` for platform-wide events, or "" for all.
    """
    rows = AuditEvent.objects.all()
    if tenant == AUDIT_PLATFORM:
        rows = rows.filter(tenant__isnull=True)
    elif tenant:
        rows = rows.filter(tenant_id=int(tenant)) if tenant.isdigit() else rows.none()
    return _audit_filtered(rows, action=action, actor=actor)


def _audit_filtered(rows: QuerySet[AuditEvent], *, action: str, actor: str) -> QuerySet[AuditEvent]:
    if action:
        rows = rows.filter(action=action)
    if actor:
        rows = rows.filter(actor_label=actor)
    return rows.select_related("tenant").order_by("-created_at", "-id")
