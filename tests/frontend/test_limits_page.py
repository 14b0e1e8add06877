"""The console's Limits page and the admin: rate limits of a tenant and of its keys, set by owners and admins."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tenants import errors, services
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_create, membership_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def signed_in(client, account):
    client.force_login(account.user)
    return client


def test_the_page_shows_the_defaults_in_force_and_what_a_client_sees(signed_in, account, settings):
    page = signed_in.get(reverse("frontend:limits")).content.decode()
    assert f"{settings.TANDEM_REQUESTS_PER_MINUTE} <span" in page and "(default)" in page
    assert "Retry-After" in page and "queued" in page and "x-ratelimit-" in page
    assert account.api_key.prefix in page and "the tenant's" in page


def test_an_owner_sets_the_tenants_limits_and_a_keys_own(signed_in, account):
    url = reverse("frontend:limits")
    response = signed_in.post(url, {"target": "tenant", "requests_per_minute": "120", "tokens_per_minute": ""})
    assert response.status_code == 302
    tenant = Tenant.objects.get(pk=account.tenant.pk)
    assert tenant.requests_per_minute == 120 and tenant.tokens_per_minute is None and tenant.max_streams is None
    response = signed_in.post(url, {"target": str(account.api_key.pk), "max_streams": "2"})
    assert response.status_code == 302 and ApiKey.objects.get(pk=account.api_key.pk).max_streams == 2
    page = signed_in.get(url).content.decode()
    assert "120" in page and "saved" in page


def test_bad_values_are_a_400_naming_the_field_and_change_nothing(signed_in, account):
    response = signed_in.post(reverse("frontend:limits"), {"target": "tenant", "requests_per_minute": "0"})
    assert response.status_code == 400 and "field-error" in response.content.decode()
    assert Tenant.objects.get(pk=account.tenant.pk).requests_per_minute is None


def test_another_tenants_key_is_not_found(signed_in, other_account):
    response = signed_in.post(reverse("frontend:limits"), {"target": str(other_account.api_key.pk), "max_streams": "1"})
    assert response.status_code == 404
    assert ApiKey.objects.get(pk=other_account.api_key.pk).max_streams is None


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_see_the_limits_but_cannot_change_them(client, account, django_user_model, role):
    user = django_user_model.objects.create_user(username=f"{role}-user", password="pw-123456789")
    membership_create(tenant=account.tenant, user=user, role=role)
    client.force_login(user)
    page = client.get(reverse("frontend:limits")).content.decode()
    assert "In force" in page and "Save limits" not in page
    response = client.post(reverse("frontend:limits"), {"target": "tenant", "requests_per_minute": "1"})
    assert response.status_code == 403 and Tenant.objects.get(pk=account.tenant.pk).requests_per_minute is None


def test_the_service_refuses_zero_and_non_members(account, other_account):
    with pytest.raises(errors.InvalidInput, match="from 1"):
        services.rate_limits_set(target=account.tenant, max_streams=0, requests_per_minute=None, tokens_per_minute=None)
    with pytest.raises((errors.PermissionDenied, errors.NotAMember)):
        services.rate_limits_set(
            target=account.tenant,
            max_streams=1,
            requests_per_minute=None,
            tokens_per_minute=None,
            by=other_account.user,
        )


def test_the_admin_edits_a_keys_limits_and_nothing_else(admin_client, account):
    key, _ = api_key_create(tenant=account.tenant, created_by=account.user, name="limited")
    url = reverse("admin:tenants_apikey_change", args=[key.pk])
    response = admin_client.post(
        url, {"max_streams": "3", "requests_per_minute": "", "tokens_per_minute": "500", "name": "renamed"}
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.max_streams, key.requests_per_minute, key.tokens_per_minute, key.name) == (3, None, 500, "limited")
