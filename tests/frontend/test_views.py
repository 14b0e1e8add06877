"""The console's pages: sign-in, the tenant switch, API keys (raw key once, hash only, roles), usage."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse

from frontend.views import SESSION_TENANT_KEY
from inference import gateway
from tenants.models import ApiKey
from tenants.services import api_key_create, membership_create

pytestmark = pytest.mark.django_db

RAW_KEY_RE = re.compile(r"tdm_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


@pytest.fixture
def signed_in(client, account):
    client.force_login(account.user)
    return client


def member(account, django_user_model, role: str):
    user = django_user_model.objects.create_user(username=f"{role}-user", password="pw-123456789")
    membership_create(tenant=account.tenant, user=user, role=role)
    return user


@pytest.mark.parametrize("name", ["playground", "api-keys", "usage", "routing", "limits"])
def test_every_page_but_sign_in_requires_a_signed_in_user(client, name):
    response = client.get(reverse(f"frontend:{name}"))
    assert response.status_code == 302 and response.url.startswith(reverse("frontend:login"))


def test_signing_in_leads_to_the_playground_and_signing_out_back_to_sign_in(client, account):
    assert client.get(reverse("frontend:login")).status_code == 200
    response = client.post(reverse("frontend:login"), {"username": "acme", "password": account.password})
    assert response.status_code == 302 and response.url == reverse("frontend:playground")
    page = client.get(response.url)
    assert page.status_code == 200 and b"tandem-test" in page.content and b'id="run"' in page.content
    response = client.post(reverse("frontend:logout"))
    assert response.status_code == 302 and response.url == reverse("frontend:login")
    assert client.get(reverse("frontend:playground")).status_code == 302


def test_a_wrong_password_is_refused_with_a_message(client, account):
    response = client.post(reverse("frontend:login"), {"username": "acme", "password": "wrong"})
    assert response.status_code == 200 and b'role="alert"' in response.content


def test_the_playground_lists_the_served_models_and_the_current_tenant(signed_in, account):
    page = signed_in.get(reverse("frontend:playground")).content.decode()
    assert 'value="tandem-test"' in page and 'value="tandem-test-broken"' in page
    assert f'data-tenant="{account.tenant.pk}"' in page and 'data-ws-path="/ws/v1/completions"' in page
    assert 'aria-live="polite"' in page


def test_the_tenant_switch_moves_only_to_the_users_own_tenants(signed_in, account, other_account):
    second = other_account.tenant
    response = signed_in.post(reverse("frontend:tenant-switch"), {"tenant": second.pk})
    assert response.status_code == 403 and SESSION_TENANT_KEY not in signed_in.session
    assert signed_in.post(reverse("frontend:tenant-switch"), {"tenant": "nope"}).status_code == 403
    membership_create(tenant=second, user=account.user, role="member")
    response = signed_in.post(reverse("frontend:tenant-switch"), {"tenant": second.pk, "next": "/keys/"})
    assert response.status_code == 302 and response.url == "/keys/"
    assert signed_in.session[SESSION_TENANT_KEY] == second.pk
    assert f'data-tenant="{second.pk}"' in signed_in.get(reverse("frontend:playground")).content.decode()


def test_the_tenant_switch_never_redirects_off_site(signed_in, account):
    response = signed_in.post(
        reverse("frontend:tenant-switch"), {"tenant": account.tenant.pk, "next": "https://evil.example/"}
    )
    assert response.status_code == 302 and response.url == reverse("frontend:playground")


def test_the_header_offers_only_the_users_tenants(signed_in, account, other_account):
    page = signed_in.get(reverse("frontend:playground")).content.decode()
    assert f'<option value="{account.tenant.pk}"' in page and other_account.tenant.name not in page


def test_a_removed_membership_falls_back_to_a_tenant_the_user_still_has(signed_in, account, other_account):
    session = signed_in.session
    session[SESSION_TENANT_KEY] = other_account.tenant.pk  # e.g. a membership deleted since
    session.save()
    page = signed_in.get(reverse("frontend:playground")).content.decode()
    assert f'data-tenant="{account.tenant.pk}"' in page


def test_creating_a_key_shows_the_raw_key_once_and_stores_only_its_hash(signed_in, account):
    expiry = date.today() + timedelta(days=30)
    response = signed_in.post(
        reverse("frontend:api-keys"), {"name": "ci runner", "scopes": ["completions"], "expires_on": expiry}
    )
    assert response.status_code == 200 and response["Cache-Control"].startswith("max-age=0")
    raw_keys = set(RAW_KEY_RE.findall(response.content.decode()))
    assert len(raw_keys) == 1
    raw_key = raw_keys.pop()
    key = ApiKey.objects.get(name="ci runner")
    assert key.key_hash == hashlib.sha256(raw_key.encode()).hexdigest() and key.scopes == ["completions"]
    assert key.expires_at == datetime.combine(expiry, datetime.min.time(), tzinfo=UTC)
    assert key.created_by == account.user and key.tenant == account.tenant
    stored = [str(v) for v in ApiKey.objects.filter(pk=key.pk).values().get().values()]
    assert raw_key not in stored
    listing = signed_in.get(reverse("frontend:api-keys")).content.decode()
    assert key.prefix in listing and raw_key not in listing and not RAW_KEY_RE.search(listing)


def test_a_key_form_with_errors_creates_nothing(signed_in, account):
    response = signed_in.post(reverse("frontend:api-keys"), {"name": "", "expires_on": "2000-01-01"})
    assert response.status_code == 400 and b"aria-invalid" in response.content
    assert ApiKey.objects.filter(tenant=account.tenant).count() == 1  # the fixture's


def test_revoking_a_key_marks_it_revoked(signed_in, account):
    response = signed_in.post(reverse("frontend:api-key-revoke", args=[account.api_key.pk]))
    assert response.status_code == 302
    account.api_key.refresh_from_db()
    assert account.api_key.revoked_at is not None
    assert b"revoked" in signed_in.get(reverse("frontend:api-keys")).content


def test_another_tenants_key_cannot_be_revoked(signed_in, other_account):
    response = signed_in.post(reverse("frontend:api-key-revoke", args=[other_account.api_key.pk]))
    assert response.status_code == 404
    other_account.api_key.refresh_from_db()
    assert other_account.api_key.revoked_at is None


def test_a_viewer_sees_keys_but_cannot_create_or_revoke_them(client, account, django_user_model):
    client.force_login(member(account, django_user_model, "viewer"))
    page = client.get(reverse("frontend:api-keys")).content.decode()
    assert account.api_key.prefix in page and "Create a key" not in page and "Revoke" not in page
    assert client.post(reverse("frontend:api-keys"), {"name": "sneaky"}).status_code == 403
    assert client.post(reverse("frontend:api-key-revoke", args=[account.api_key.pk])).status_code == 403
    assert not ApiKey.objects.filter(name="sneaky").exists()
    account.api_key.refresh_from_db()
    assert account.api_key.revoked_at is None
    assert b'id="run"' not in client.get(reverse("frontend:playground")).content


def test_a_member_revokes_their_own_keys_but_not_the_owners(client, account, django_user_model):
    user = member(account, django_user_model, "member")
    own, _ = api_key_create(tenant=account.tenant, created_by=user, name="mine")
    client.force_login(user)
    page = client.get(reverse("frontend:api-keys")).content.decode()
    assert f"Revoke mine ({own.prefix})" in page and f"({account.api_key.prefix})" not in page
    assert client.post(reverse("frontend:api-key-revoke", args=[account.api_key.pk])).status_code == 403
    assert client.post(reverse("frontend:api-key-revoke", args=[own.pk])).status_code == 302
    own.refresh_from_db()
    assert own.revoked_at is not None


def test_an_admin_revokes_anyones_key(client, account, django_user_model):
    client.force_login(member(account, django_user_model, "admin"))
    assert client.post(reverse("frontend:api-key-revoke", args=[account.api_key.pk])).status_code == 302
    account.api_key.refresh_from_db()
    assert account.api_key.revoked_at is not None


def test_a_user_without_a_tenant_is_told_so(client, django_user_model, db):
    client.force_login(django_user_model.objects.create_user(username="loner", password="pw-123456789"))
    response = client.get(reverse("frontend:playground"))
    assert response.status_code == 403 and b"not in any tenant" in response.content


def test_the_usage_page_starts_empty(signed_in):
    response = signed_in.get(reverse("frontend:usage"))
    assert response.status_code == 200 and b"No requests yet" in response.content


@pytest.mark.django_db(transaction=True)  # the gateway settles from its own threads
def test_the_usage_page_shows_only_the_current_tenants_ledger(client, account, other_account):
    async def complete(raw_key: str) -> str:
        stream = await gateway.start(
            await gateway.authenticate_api_key(raw_key), gateway.CompletionCall(model="tandem-test", prompt="Hi")
        )
        await gateway.collect(stream)
        return stream.request_id

    mine, theirs = async_to_sync(complete)(account.raw_key), async_to_sync(complete)(other_account.raw_key)
    client.force_login(account.user)
    page = client.get(reverse("frontend:usage")).content.decode()
    assert mine in page and theirs not in page


# routing ----------------------------------------------------------------------------------------
POLICY_FORM = {
    "allowed_tiers": ["edge", "speculative"],
    "allow_requested_tier": "on",
    "pii_action": "keep_off_cloud",
    "difficulty_routing": "on",
    "cloud_threshold": "",
    "hard_threshold": "0.3",
    "edge_max_output_tokens": "512",
    "edge_max_prompt_tokens": "2048",
    "edge_max_streams": "8",
    "at_capacity": "wait",
    "cache_ttl_s": "3600",
    "escalation_min_mean_logprob": "-2.5",
    "escalation_max_low_share": "0.3",
    "escalation_hold_tokens": "16",
    "note": "no cloud for now",
}


def test_the_routing_page_shows_the_policy_in_force_and_the_tier_health(signed_in):
    page = signed_in.get(reverse("frontend:routing")).content.decode()
    assert "builtin-2" in page and "Tier health" in page and "verifier" not in page.split("Tier health")[0][-50:]


def test_an_owner_publishes_a_new_version_and_it_is_in_force(signed_in, account):
    from inference.selectors import routing_policy_for

    response = signed_in.post(reverse("frontend:routing"), POLICY_FORM)
    assert response.status_code == 302
    policy = routing_policy_for(tenant_id=account.tenant.pk)
    assert policy.version == f"t{account.tenant.pk}-v1" and {t.value for t in policy.allowed} == {"edge", "speculative"}
    assert policy.hard_threshold == 0.3 and policy.cloud_threshold is None
    page = signed_in.get(reverse("frontend:routing")).content.decode()
    assert "no cloud for now" in page and "in force" in page


def test_an_invalid_policy_is_shown_back_with_the_error_and_nothing_is_published(signed_in, account):
    from inference.models import RoutingPolicy

    response = signed_in.post(reverse("frontend:routing"), POLICY_FORM | {"allowed_tiers": []})
    assert response.status_code == 400 and 'role="alert"' in response.content.decode()
    assert not RoutingPolicy.objects.exists()


def test_a_member_sees_the_policy_but_may_not_publish(client, account, django_user_model):
    client.force_login(member(account, django_user_model, "member"))
    page = client.get(reverse("frontend:routing"))
    assert page.status_code == 200 and b"Only owners and admins" in page.content
    assert client.post(reverse("frontend:routing"), POLICY_FORM).status_code == 403


UPSTREAM_FORM = {
    "upstream": "1",
    "name": "provider-a",
    "model": "tandem-test",
    "base_url": "https://llm.example.net/v1",
    "api_key_env": "PROVIDER_A_KEY",
    "upstream_model": "big-model",
    "prompt_per_mtok": "2.5",
    "completion_per_mtok": "10",
    "all_tenants": "on",
    "priority": "10",
    "note": "primary",
}


def test_an_operator_registers_a_cloud_upstream_from_the_console(client, account):
    from inference.models import CloudUpstream
    from tenants.selectors import price_active

    account.user.is_staff = True
    account.user.save()
    client.force_login(account.user)
    assert b"Register a cloud upstream" in client.get(reverse("frontend:routing")).content
    assert client.post(reverse("frontend:routing"), UPSTREAM_FORM).status_code == 302
    upstream = CloudUpstream.objects.get(name="provider-a")
    assert (upstream.api_key_env, upstream.all_tenants, upstream.priority) == ("PROVIDER_A_KEY", True, 10)
    assert str(price_active(model="tandem-test", tier="cloud").completion_per_mtok).startswith("10")
    bad = client.post(reverse("frontend:routing"), UPSTREAM_FORM | {"api_key_env": "sk-live-this-is-a-key"})
    assert bad.status_code == 400 and b"environment variable name" in bad.content


def test_a_tenant_owner_who_is_not_an_operator_may_not_register_upstreams(signed_in):
    assert b"Register a cloud upstream" not in signed_in.get(reverse("frontend:routing")).content
    assert signed_in.post(reverse("frontend:routing"), UPSTREAM_FORM).status_code == 403


def test_an_owner_forgets_the_tenants_cached_answers_and_a_member_may_not(
    signed_in, account, client, django_user_model
):
    from asgiref.sync import async_to_sync

    from inference.cache import CachedAnswer, exact_cache

    answer = CachedAnswer("edge", (1,), ("edge",), "0", "0", "stop", 0.0)
    async_to_sync(exact_cache.local.put)(f"tandem:cache:v1:t{account.tenant.pk}:x", answer.to_json(), 60)
    async_to_sync(exact_cache.local.put)("tandem:cache:v1:t999999:y", answer.to_json(), 60)
    page = signed_in.get(reverse("frontend:routing")).content.decode()
    assert "Forget cached answers" in page and "Result cache" in page
    response = signed_in.post(reverse("frontend:routing"), {"forget_cache": "1"}, follow=True)
    assert "Forgot 1 cached answer" in response.content.decode()
    assert list(exact_cache.local._entries) == ["tandem:cache:v1:t999999:y"]  # another tenant's stays
    viewer = member(account, django_user_model, "member")
    client.force_login(viewer)
    assert client.post(reverse("frontend:routing"), {"forget_cache": "1"}).status_code == 403
    exact_cache.reset()
