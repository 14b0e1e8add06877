"""The admin: every page renders, money rows are read-only, keys are never shown or created there."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from tenants import services
from tenants.models import ApiKey, Budget, Membership, Price, PriceBook, Reservation, Tenant, UsageRecord
from tests.tenants.factories import usage_for

pytestmark = pytest.mark.django_db

MODELS = [Tenant, Membership, ApiKey, Budget, PriceBook, Price, Reservation, UsageRecord]


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:tenants_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def settled(tenant, owner, price):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    reservation = services.budget_reserve(
        tenant=tenant, api_key=api_key, amount=Decimal("0.5"), request_id="r1", price=price
    )
    return services.usage_settle(reservation=reservation, usage=usage_for(reservation))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_list_and_detail_page_renders(admin_client, settled, model):
    assert admin_client.get(_url(model, "changelist")).status_code == 200
    obj = model.objects.first()
    assert admin_client.get(_url(model, "change", obj.pk)).status_code == 200


def test_keys_cannot_be_added_or_deleted_by_hand_and_a_change_saves_only_their_rate_limits(admin_client, settled):
    assert admin_client.get(_url(ApiKey, "add")).status_code == 403
    key = ApiKey.objects.first()
    before = {f.name: getattr(key, f.name) for f in ApiKey._meta.fields}
    response = admin_client.post(_url(ApiKey, "change", key.pk), {"name": "x", "revoked_at": "2020-01-01 00:00"})
    assert response.status_code == 302
    key.refresh_from_db()
    assert {f.name: getattr(key, f.name) for f in ApiKey._meta.fields} == before  # empty limits were empty already
    assert admin_client.post(_url(ApiKey, "delete", key.pk), {"post": "yes"}).status_code == 403


@pytest.mark.parametrize("model", [Reservation, UsageRecord, PriceBook, Price], ids=lambda m: m.__name__)
def test_money_rows_cannot_be_added_or_edited_by_hand(admin_client, settled, model):
    assert admin_client.get(_url(model, "add")).status_code == 403
    obj = model.objects.first()
    assert admin_client.post(_url(model, "change", obj.pk), {}).status_code == 403
    assert admin_client.post(_url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403


def test_the_api_key_page_shows_neither_key_nor_hash(admin_client, tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    page = admin_client.get(_url(ApiKey, "change", api_key.pk)).content.decode()
    assert api_key.prefix in page
    assert raw_key not in page and api_key.key_hash not in page


def test_the_revoke_action_revokes_through_the_service(admin_client, tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    response = admin_client.post(
        _url(ApiKey, "changelist"), {"action": "revoke", "_selected_action": [api_key.pk]}, follow=True
    )
    assert response.status_code == 200
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None


def test_saving_a_budget_in_the_admin_changes_its_limits_and_keeps_its_counters(admin_client, tenant):
    budget = services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    services.budget_reserve(tenant=tenant, api_key=None, amount=Decimal("0.3"), request_id="r1")
    response = admin_client.post(_url(Budget, "change", budget.pk), {"hard_limit": "2", "soft_limit": "1.5"})
    assert response.status_code == 302
    budget.refresh_from_db()
    assert (budget.hard_limit, budget.soft_limit, budget.reserved) == (Decimal(2), Decimal("1.5"), Decimal("0.3"))


def test_the_budget_form_refuses_a_soft_limit_above_the_hard_limit(admin_client, tenant):
    budget = services.budget_set(tenant=tenant, period="month", hard_limit=Decimal(1), soft_limit=None)
    response = admin_client.post(_url(Budget, "change", budget.pk), {"hard_limit": "1", "soft_limit": "2"})
    assert response.status_code == 200  # the form again, with the error
    budget.refresh_from_db()
    assert budget.soft_limit is None


def test_adding_a_budget_in_the_admin_goes_through_the_service(admin_client, tenant):
    response = admin_client.post(
        _url(Budget, "add"), {"tenant": tenant.pk, "period": "day", "hard_limit": "3", "soft_limit": ""}
    )
    assert response.status_code == 302
    budget = Budget.objects.get(tenant=tenant)
    assert (budget.period, budget.hard_limit, budget.reserved) == ("day", Decimal(3), 0)
    assert budget.period_start is not None
