"""Reads of the tenants app: prices, memberships, keys, the ledger and budgets, always scoped to one tenant or user.

Selectors never write. A budget whose period has ended but that no request has touched
since is shown as the new period would start (nothing spent yet), without saving it.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from tenants import errors
from tenants.models import ApiKey, Budget, Membership, Price, Tenant, Tier, UsageRecord

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User


def price_active(*, model: str, tier: str) -> Price:
    """The active price book's price for ``model`` on ``tier``; ``errors.PriceNotFound`` if it has none."""
    try:
        return Price.objects.select_related("book").get(book__is_active=True, model=model, tier=tier)
    except Price.DoesNotExist:
        raise errors.PriceNotFound(f"no active price for {model!r} on the {tier} tier") from None


def price_in_book(*, book_id: int, model: str, tier: str) -> Price:
    """The price for ``model`` on ``tier`` in one (immutable) book; ``errors.PriceNotFound`` if it has none."""
    try:
        return Price.objects.select_related("book").get(book_id=book_id, model=model, tier=tier)
    except Price.DoesNotExist:
        raise errors.PriceNotFound(f"no price for {model!r} on the {tier} tier in this book") from None


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
    spend = {tier: Decimal(0) for tier in Tier.values}
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
