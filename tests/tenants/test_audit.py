"""The audit log: each audited service writes exactly one event, with its actor and no secret, in its own transaction;
events are append-only; the admin only reads them."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.db import transaction
from django.urls import reverse

from inference.services import cloud_upstream_register, routing_policy_publish
from tenants import errors, services
from tenants.models import AuditEvent, AuditLogImmutable, Invite, Membership
from tests.tenants.factories import PRICES

pytestmark = pytest.mark.django_db


def only_event(action: str) -> AuditEvent:
    events = list(AuditEvent.objects.filter(action=action))
    assert len(events) == 1, f"{action}: {len(events)} events"
    return events[0]


def as_text(event: AuditEvent) -> str:
    return json.dumps(event.changes)


def test_creating_a_key_records_its_creator_and_neither_the_key_nor_its_hash(tenant, owner):
    key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci", scopes=["completions"])
    event = only_event("api_key.create")
    assert (event.tenant_id, event.actor_kind, event.actor_user_id, event.actor_label) == (
        tenant.pk,
        "user",
        owner.pk,
        "acme-owner",
    )
    assert (event.object_type, event.object_id) == ("tenants.apikey", str(key.pk))
    assert event.changes["name"] == {"before": None, "after": "ci"}
    assert event.changes["scopes"]["after"] == ["completions"]
    secret = raw_key.split("_", 2)[2]
    for leak in (raw_key, secret, key.key_hash):
        assert leak not in as_text(event)
        assert leak not in event.actor_label


def test_a_system_caller_is_recorded_as_the_system(tenant):
    services.api_key_create(tenant=tenant, created_by=None, name="by a command")
    event = only_event("api_key.create")
    assert (event.actor_kind, event.actor_user_id, event.actor_label) == ("system", None, "system")


def test_revoking_a_key_records_who_and_when_once(tenant, owner):
    key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_revoke(api_key=key, by=owner)
    services.api_key_revoke(api_key=key, by=owner)  # already revoked: nothing changes, nothing recorded
    event = only_event("api_key.revoke")
    assert event.actor_user_id == owner.pk and event.changes["revoked_at"]["before"] is None
    assert raw_key not in as_text(event)


def test_setting_a_budget_records_the_limits_before_and_after(tenant, owner):
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal("10"), soft_limit=None, by=owner)
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal("25.5"), soft_limit=Decimal("20"), by=owner)
    services.budget_set(tenant=tenant, period="month", hard_limit=Decimal("25.5"), soft_limit=Decimal("20"), by=owner)
    first, second = AuditEvent.objects.filter(action="budget.set").order_by("id")  # the third changed nothing
    assert first.changes["hard_limit"] == {"before": None, "after": "10"}
    assert first.changes["period"] == {"before": None, "after": "month"}
    assert second.changes == {
        "hard_limit": {"before": "10", "after": "25.5"},
        "soft_limit": {"before": None, "after": "20"},
    }
    assert second.actor_user_id == owner.pk and second.tenant_id == tenant.pk


def test_a_member_cannot_set_a_budget_and_nothing_is_recorded(tenant, make_user):
    member = make_user("a-member")
    services.membership_create(tenant=tenant, user=member, role="member")
    with pytest.raises(errors.PermissionDenied):
        services.budget_set(tenant=tenant, period="day", hard_limit=Decimal(1), soft_limit=None, by=member)
    assert not AuditEvent.objects.filter(action="budget.set").exists()


def test_setting_limits_records_the_fields_changed(tenant, owner):
    values = {"max_streams": None, "requests_per_minute": 60, "tokens_per_minute": None}
    services.rate_limits_set(target=tenant, by=owner, **values)
    services.rate_limits_set(target=tenant, by=owner, **values)  # the same again: no event
    event = only_event("limits.set")
    assert event.changes == {"requests_per_minute": {"before": None, "after": 60}}
    assert (event.object_type, event.tenant_id, event.actor_user_id) == ("tenants.tenant", tenant.pk, owner.pk)


def test_publishing_a_price_book_is_platform_wide(db, make_user):
    operator = make_user("operator")
    services.price_book_publish(version=1, prices=PRICES, note="first", by=operator)
    services.price_book_publish(version=2, prices=PRICES[:1], note="second")
    first, second = AuditEvent.objects.filter(action="price_book.publish").order_by("id")
    assert first.tenant_id is None and first.actor_user_id == operator.pk
    assert first.changes["version"] == {"before": None, "after": 1}
    assert second.actor_kind == "system"
    assert second.changes["version"] == {"before": 1, "after": 2}
    assert second.changes["prices"] == {"before": 3, "after": 1}


def test_publishing_a_routing_policy_records_its_author_and_the_fields_changed(tenant, owner):
    policy = routing_policy_publish(tenant=tenant, created_by=owner, allowed_tiers=["edge"], note="edge only")
    event = only_event("policy.publish")
    assert (event.tenant_id, event.actor_user_id, event.object_id) == (tenant.pk, owner.pk, str(policy.pk))
    assert event.changes["allowed_tiers"]["after"] == ["edge"] and event.changes["note"]["after"] == "edge only"
    assert event.changes["version"] == {"before": 0, "after": 1}


def test_registering_an_upstream_records_the_operator_and_never_the_providers_key(price_book, make_user, monkeypatch):
    operator = make_user("operator")
    monkeypatch.setenv("ACME_UPSTREAM_KEY", "sk-very-secret-provider-key")
    upstream = cloud_upstream_register(
        name="acme-cloud",
        model="tandem-demo",
        base_url="http://upstream.invalid/v1",
        upstream_model="big-model",
        prompt_per_mtok="0.7",
        completion_per_mtok="2.1",
        api_key_env="ACME_UPSTREAM_KEY",
        by=operator,
    )
    event = only_event("upstream.register")
    assert (event.tenant_id, event.actor_user_id, event.object_id) == (None, operator.pk, str(upstream.pk))
    assert event.changes["base_url"]["after"] == "http://upstream.invalid/v1"
    assert "sk-very-secret-provider-key" not in as_text(event)  # only the variable's name is recorded
    # its cloud price went into a new book, published by the operator too
    assert AuditEvent.objects.filter(action="price_book.publish", actor_user=operator).count() == 1


def test_the_team_services_each_record_one_event_and_never_the_invite_token(tenant, owner, make_user):
    invite, token = services.invite_create(tenant=tenant, email="new@acme.invalid", role="member", by=owner)
    newcomer = make_user("newcomer")
    membership = services.invite_accept(raw_token=token, user=newcomer)
    services.membership_role_set(membership=membership, role="admin", by=owner)
    services.membership_remove(membership=membership, by=owner)
    other, other_token = services.invite_create(tenant=tenant, email="late@acme.invalid", role="viewer", by=owner)
    services.invite_revoke(invite=other, by=owner)

    invited = AuditEvent.objects.get(action="member.invite", object_id=str(invite.pk))
    assert invited.actor_user_id == owner.pk and invited.changes["email"]["after"] == "new@acme.invalid"
    accepted = only_event("invite.accept")
    assert accepted.actor_user_id == newcomer.pk and accepted.changes["role"]["after"] == "member"
    role = only_event("member.role")
    assert role.changes["role"] == {"before": "member", "after": "admin"}
    removed = only_event("member.remove")
    assert removed.changes["user"] == {"before": "newcomer", "after": None}
    assert only_event("invite.revoke").object_id == str(other.pk)
    for event in AuditEvent.objects.all():
        for secret in (token, other_token, invite.token_hash, Invite.objects.get(pk=other.pk).token_hash):
            assert secret not in as_text(event)
        assert event.tenant_id == tenant.pk


def test_an_event_commits_or_rolls_back_with_its_change(tenant, owner):
    with pytest.raises(RuntimeError), transaction.atomic():
        services.api_key_create(tenant=tenant, created_by=owner, name="rolled back")
        raise RuntimeError("the caller's transaction fails after the service")
    assert not AuditEvent.objects.filter(action="api_key.create").exists()


def test_the_recorder_refuses_secret_fields_and_unknown_actions(tenant, owner):
    key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    for changes in ({"key_hash": {"after": "x"}}, {"password": {"after": "x"}}, {"token": {"after": "x"}}):
        with pytest.raises(errors.InvalidInput, match="secret"):
            services.audit_event_record(action="api_key.create", by=owner, tenant=tenant, obj=key, changes=changes)
    with pytest.raises(errors.InvalidInput, match="unknown audit action"):
        services.audit_event_record(action="key.steal", by=owner, tenant=tenant, obj=key, changes={})


def test_events_cannot_be_updated_or_deleted(tenant, owner):
    services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    event = only_event("api_key.create")
    event.actor_label = "someone else"
    with pytest.raises(AuditLogImmutable):
        event.save()
    with pytest.raises(AuditLogImmutable):
        event.delete()
    with pytest.raises(AuditLogImmutable):
        AuditEvent.objects.filter(pk=event.pk).update(actor_label="someone else")
    with pytest.raises(AuditLogImmutable):
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).actor_label == "acme-owner"


def test_a_tenant_with_audit_events_cannot_be_deleted(tenant, owner):
    from django.db.models import ProtectedError

    services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    with pytest.raises(ProtectedError):
        tenant.delete()


def test_the_admin_lists_events_read_only(admin_client, tenant, owner):
    services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    event = only_event("api_key.create")
    assert admin_client.get(reverse("admin:tenants_auditevent_changelist")).status_code == 200
    change = reverse("admin:tenants_auditevent_change", args=[event.pk])
    page = admin_client.get(change)
    assert page.status_code == 200 and b"api_key.create" in page.content and b'name="_save"' not in page.content
    assert admin_client.post(change, {"actor_label": "forged"}).status_code == 403
    assert admin_client.get(reverse("admin:tenants_auditevent_add")).status_code == 403
    assert (
        admin_client.post(reverse("admin:tenants_auditevent_delete", args=[event.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert AuditEvent.objects.get(pk=event.pk).actor_label == "acme-owner"
    assert admin_client.get(reverse("admin:tenants_invite_changelist")).status_code == 200


def test_admin_edits_are_recorded_as_the_system(admin_client, tenant):
    url = reverse("admin:tenants_budget_add")
    response = admin_client.post(url, {"tenant": tenant.pk, "period": "day", "hard_limit": "5", "soft_limit": ""})
    assert response.status_code == 302
    event = only_event("budget.set")
    assert event.actor_kind == "system" and event.changes["hard_limit"]["after"] == "5"


def test_an_api_key_as_actor_is_recorded_by_its_prefix_never_its_secret(tenant, owner):
    key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="automation")
    event = services.audit_event_record(
        action="limits.set", by=key, tenant=tenant, obj=tenant, changes={"max_streams": {"before": None, "after": 2}}
    )
    assert (event.actor_kind, event.actor_api_key_id, event.actor_label) == ("api_key", key.pk, key.prefix)
    assert raw_key not in event.actor_label + as_text(event)


def test_the_admin_changes_roles_through_the_services_and_keeps_the_last_owner(admin_client, tenant, owner, make_user):
    mine = Membership.objects.get(tenant=tenant, user=owner)
    change = reverse("admin:tenants_membership_change", args=[mine.pk])
    refused = admin_client.post(change, {"role": "admin"})
    assert refused.status_code == 200 and b"at least one owner" in refused.content
    assert (
        admin_client.post(reverse("admin:tenants_membership_delete", args=[mine.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert Membership.objects.get(pk=mine.pk).role == "owner"

    newcomer = make_user("newcomer")
    added = admin_client.post(
        reverse("admin:tenants_membership_add"), {"user": newcomer.pk, "tenant": tenant.pk, "role": "owner"}
    )
    assert added.status_code == 302
    assert only_event("member.add").changes == {
        "user": {"before": None, "after": "newcomer"},
        "role": {"before": None, "after": "owner"},
    }
    assert admin_client.post(change, {"role": "viewer"}).status_code == 302  # another owner now
    event = only_event("member.role")
    assert event.actor_kind == "system" and event.changes["role"] == {"before": "owner", "after": "viewer"}
    assert Membership.objects.get(pk=mine.pk).role == "viewer"
    assert (
        admin_client.post(reverse("admin:tenants_membership_delete", args=[mine.pk]), {"post": "yes"}).status_code
        == 302
    )
    assert only_event("member.remove").changes["user"]["before"] == "acme-owner"


def test_an_upstream_registered_in_the_admin_is_recorded_as_its_operator(admin_client, admin_user):
    url = reverse("admin:inference_cloudupstream_add")
    form = {
        "name": "acme-cloud",
        "model": "tandem-test",
        "base_url": "https://cloud.example.com/v1",
        "api_key_env": "ACME_CLOUD_KEY",
        "upstream_model": "big-model",
        "connect_timeout_s": "3",
        "first_token_timeout_s": "30",
        "idle_timeout_s": "30",
        "priority": "100",
        "enabled": "on",
        "all_tenants": "on",
        "prompt_per_mtok": "1.00",
        "completion_per_mtok": "3.00",
    }
    response = admin_client.post(url, form)
    errors = response.context["adminform"].form.errors if response.status_code == 200 else None
    assert response.status_code == 302, errors
    event = only_event("upstream.register")
    assert event.actor_kind == "user" and event.actor_user_id == admin_user.pk
    assert event.changes["base_url"]["after"] == "https://cloud.example.com/v1"
    price_event = AuditEvent.objects.filter(action="price_book.publish").latest("pk")
    assert price_event.actor_user_id == admin_user.pk
