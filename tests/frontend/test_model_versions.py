"""The console's Models page: versions for everyone in a tenant, pins for owners, rollouts for operators."""

from __future__ import annotations

import pytest
from django.urls import reverse

from registry.models import ModelVersion, Rollout, TenantModelPin
from tenants.services import membership_create

pytestmark = pytest.mark.django_db

MODEL = "tandem-test"


@pytest.fixture
def drafts():
    current = ModelVersion.objects.create(
        model=MODEL, role="draft", version="trivial@0", source="a.gguf", format="gguf", status="current"
    )
    other = ModelVersion.objects.create(
        model=MODEL, role="draft", version="trivial@1", source="b.gguf", format="gguf", status="retired"
    )
    return current, other


def test_a_member_sees_the_versions_but_no_rollouts_and_no_pin_button(client, account, drafts, django_user_model):
    member = django_user_model.objects.create_user(username="m", password="pw-m-1234567")
    membership_create(tenant=account.tenant, user=member, role="member")
    client.force_login(member)
    page = client.get(reverse("frontend:models")).content.decode()
    assert "trivial@0" in page and "trivial@1" in page
    assert "Rollouts" not in page and 'name="version"' not in page
    assert client.get(reverse("frontend:models") + "?part=rollouts").status_code == 403


def test_an_owner_pins_a_draft_from_the_page(client, account, drafts):
    client.force_login(account.user)
    response = client.post(reverse("frontend:model-pin"), {"model": MODEL, "version": drafts[1].pk})
    assert response.status_code == 302
    assert TenantModelPin.objects.get(tenant=account.tenant, model=MODEL).version == drafts[1]
    assert "pinned" in client.get(reverse("frontend:models")).content.decode()


def test_an_operator_promotes_a_canary_from_the_page_and_a_member_cannot(client, account, drafts, admin_user):
    current, other = drafts
    rollout = Rollout.objects.create(
        model=MODEL, source_version=other, candidate=other, baseline=current, status="canary"
    )
    client.force_login(account.user)  # an owner, not staff
    refused = client.post(reverse("frontend:rollout-action"), {"rollout": rollout.pk, "action": "promote"})
    assert refused.status_code == 403 and Rollout.objects.get(pk=rollout.pk).status == "canary"
    membership_create(tenant=account.tenant, user=admin_user, role="member")
    client.force_login(admin_user)
    assert f"Rollout {rollout.pk}" in client.get(reverse("frontend:models") + "?part=rollouts").content.decode()
    client.post(reverse("frontend:rollout-action"), {"rollout": rollout.pk, "action": "promote"})
    assert Rollout.objects.get(pk=rollout.pk).status == "promoted"
    assert ModelVersion.objects.get(pk=other.pk).status == "current"
