"""Reads: the ledger, spend by tier and budget status, each scoped to one tenant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from tenants import selectors, services
from tenants.models import Budget, UsageRecord
from tests.tenants.factories import usage_for

pytestmark = pytest.mark.django_db


def _settle(tenant, request_id, price, **usage):
    reservation = services.budget_reserve(
        tenant=tenant, api_key=None, amount=Decimal(1), request_id=request_id, price=price
    )
    return services.usage_settle(reservation=reservation, usage=usage_for(reservation, **usage))


def test_api_keys_for_tenant_lists_only_that_tenants_keys(tenant, other_tenant):
    mine, _ = services.api_key_create(tenant=tenant, created_by=None, name="mine")
    services.api_key_create(tenant=other_tenant, created_by=None, name="theirs")
    assert list(selectors.api_keys_for_tenant(tenant=tenant)) == [mine]


def test_usage_for_tenant_is_newest_first_limited_and_scoped(tenant, other_tenant, price):
    for n in range(3):
        _settle(tenant, f"a{n}", price)
    _settle(other_tenant, "b0", price)
    rows = selectors.usage_for_tenant(tenant=tenant, limit=2)
    assert [r.request_id for r in rows] == ["a2", "a1"]


def test_spend_by_tier_sums_each_tier_and_lists_every_tier(tenant, other_tenant, price):
    _settle(tenant, "a0", price)
    _settle(tenant, "a1", price)
    _settle(tenant, "a2", price, route_tier="cloud", drafted_tokens=Decimal(0), gpu_ms=Decimal(0))
    _settle(other_tenant, "b0", price)
    spend = selectors.spend_by_tier(tenant=tenant)
    assert spend == {"edge": Decimal(0), "speculative": Decimal("0.003632"), "cloud": Decimal("0.006")}
    assert all(isinstance(v, Decimal) for v in spend.values())


def test_spend_by_tier_since_leaves_out_older_rows(tenant, price):
    old = _settle(tenant, "old", price)
    UsageRecord.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    _settle(tenant, "new", price)
    spend = selectors.spend_by_tier(tenant=tenant, since=timezone.now() - timedelta(days=30))
    assert spend["speculative"] == Decimal("0.001816")


def test_budget_status_shows_limits_counters_and_what_is_left(tenant, owner):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=Decimal("0.5"))
    services.budget_set(tenant=tenant, api_key=api_key, period="day", hard_limit=None, soft_limit=None)
    services.budget_reserve(tenant=tenant, api_key=api_key, amount=Decimal("0.4"), request_id="r1")
    tenant_wide, per_key = selectors.budget_status(tenant=tenant)
    assert tenant_wide["scope"] == "tenant" and per_key["api_key_prefix"] == api_key.prefix
    assert (tenant_wide["reserved"], tenant_wide["spent"], tenant_wide["left"]) == (Decimal("0.4"), 0, Decimal("0.6"))
    assert per_key["left"] is None


def test_budget_status_shows_a_stale_period_as_the_new_one_without_writing(tenant):
    services.budget_set(tenant=tenant, period="day", hard_limit=Decimal(1), soft_limit=None)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    Budget.objects.filter(tenant=tenant).update(period_start=yesterday, spent=Decimal("0.9"))
    (status,) = selectors.budget_status(tenant=tenant)
    assert (status["spent"], status["left"], status["period_start"]) == (0, Decimal(1), datetime.now(UTC).date())
    assert Budget.objects.get(tenant=tenant).spent == Decimal("0.9")
