"""API keys: created once, stored only as a hash, authenticated for their own tenant only, revocable, expiring."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenants import errors, services
from tenants.models import ApiKey

pytestmark = pytest.mark.django_db


def _updates(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]


def test_create_returns_the_full_key_once_in_the_documented_form(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    assert re.fullmatch(r"tdm_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", raw_key)
    assert raw_key.startswith(api_key.prefix + "_")
    assert api_key.tenant == tenant and api_key.created_by == owner


def test_the_raw_key_is_never_stored(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    secret = raw_key.split("_", 2)[2]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table} WHERE id = %s", [api_key.pk])
        row = cursor.fetchone()
    assert not any(secret in str(value) for value in row)
    assert api_key.key_hash == hashlib.sha256(raw_key.encode()).hexdigest()


def test_authenticate_returns_the_key_with_its_tenant(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    found = services.api_key_authenticate(raw_key=raw_key)
    assert found == api_key
    assert found.tenant == tenant


def test_a_key_of_tenant_a_never_authenticates_as_tenant_b(tenant, owner, other_tenant):
    key_a, raw_a = services.api_key_create(tenant=tenant, created_by=owner, name="a")
    key_b, raw_b = services.api_key_create(tenant=other_tenant, created_by=None, name="b")
    assert services.api_key_authenticate(raw_key=raw_a).tenant_id == tenant.pk
    assert services.api_key_authenticate(raw_key=raw_b).tenant_id == other_tenant.pk
    # A's secret behind B's visible prefix is no key at all.
    forged = key_b.prefix + "_" + raw_a.split("_", 2)[2]
    with pytest.raises(errors.InvalidApiKey):
        services.api_key_authenticate(raw_key=forged)


@pytest.mark.parametrize(
    "raw_key",
    [
        "",
        "tdm_",
        "not-a-key",
        "tdm_0123abcd_" + "x" * 42,  # one character short
        "tdm_0123ABCD_" + "x" * 43,  # prefix must be lowercase hex
        "tdm_0123abcd_" + "x" * 43,  # well-formed, unknown
        "tdm_0123abcd_" + "x" * 10_000,
    ],
)
def test_unknown_or_malformed_keys_are_refused(raw_key, tenant):
    with pytest.raises(errors.InvalidApiKey, match="^invalid API key$"):
        services.api_key_authenticate(raw_key=raw_key)


def test_a_revoked_key_is_refused_with_the_same_message(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_revoke(api_key=api_key, by=owner)
    with pytest.raises(errors.InvalidApiKey, match="^invalid API key$"):
        services.api_key_authenticate(raw_key=raw_key)


def test_an_expired_key_is_refused_with_the_same_message(tenant, owner):
    api_key, raw_key = services.api_key_create(
        tenant=tenant, created_by=owner, name="ci", expires_at=timezone.now() + timedelta(hours=1)
    )
    assert services.api_key_authenticate(raw_key=raw_key) == api_key
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(errors.InvalidApiKey, match="^invalid API key$"):
        services.api_key_authenticate(raw_key=raw_key)


def test_a_key_cannot_be_created_already_expired(tenant, owner):
    with pytest.raises(errors.InvalidInput, match="future"):
        services.api_key_create(tenant=tenant, created_by=owner, name="ci", expires_at=timezone.now())


def test_last_used_at_is_written_on_first_use(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    assert api_key.last_used_at is None
    services.api_key_authenticate(raw_key=raw_key)
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


def test_last_used_at_is_written_at_most_once_a_minute(tenant, owner):
    _, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_authenticate(raw_key=raw_key)
    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            services.api_key_authenticate(raw_key=raw_key)
    assert _updates(queries.captured_queries) == []


def test_last_used_at_is_written_again_after_a_minute(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    an_hour_ago = timezone.now() - timedelta(hours=1)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=an_hour_ago)
    with CaptureQueriesContext(connection) as queries:
        found = services.api_key_authenticate(raw_key=raw_key)
    assert len(_updates(queries.captured_queries)) == 1
    api_key.refresh_from_db()
    assert api_key.last_used_at == found.last_used_at > an_hour_ago


def test_empty_scopes_allow_every_scope(tenant, owner):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    assert api_key.scopes == []
    assert api_key.allows("completions") and api_key.allows("models:read")


def test_scopes_restrict_a_key(tenant, owner):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ro", scopes=["models:read"])
    found = services.api_key_authenticate(raw_key=raw_key)
    assert found.allows("models:read")
    assert not found.allows("completions")


def test_unknown_scopes_are_refused(tenant, owner):
    with pytest.raises(errors.InvalidInput, match="unknown scopes"):
        services.api_key_create(tenant=tenant, created_by=owner, name="ci", scopes=["admin"])


def test_a_viewer_cannot_create_keys(tenant, make_user):
    viewer = make_user()
    services.membership_create(tenant=tenant, user=viewer, role="viewer")
    with pytest.raises(errors.PermissionDenied):
        services.api_key_create(tenant=tenant, created_by=viewer, name="ci")


def test_a_non_member_cannot_create_keys(tenant, make_user):
    with pytest.raises(errors.NotAMember):
        services.api_key_create(tenant=tenant, created_by=make_user(), name="ci")


def test_a_member_revokes_their_own_keys_but_not_others(tenant, owner, make_user):
    member = make_user()
    services.membership_create(tenant=tenant, user=member, role="member")
    own, _ = services.api_key_create(tenant=tenant, created_by=member, name="mine")
    owners, _ = services.api_key_create(tenant=tenant, created_by=owner, name="theirs")
    services.api_key_revoke(api_key=own, by=member)
    assert own.revoked_at is not None
    with pytest.raises(errors.PermissionDenied):
        services.api_key_revoke(api_key=owners, by=member)


def test_an_admin_revokes_any_key_of_the_tenant(tenant, owner, make_user):
    admin = make_user()
    services.membership_create(tenant=tenant, user=admin, role="admin")
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_revoke(api_key=api_key, by=admin)
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None


def test_an_owner_of_another_tenant_cannot_revoke_a_key(tenant, owner, other_tenant):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    other_owner = other_tenant.memberships.get().user
    with pytest.raises(errors.NotAMember):
        services.api_key_revoke(api_key=api_key, by=other_owner)


def test_revoking_twice_keeps_the_first_revocation_time(tenant, owner):
    api_key, _ = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    first = services.api_key_revoke(api_key=api_key).revoked_at
    again = services.api_key_revoke(api_key=ApiKey.objects.get(pk=api_key.pk)).revoked_at
    assert again == first


# the in-process key cache -------------------------------------------------------------------------
@pytest.fixture
def key_cache(settings, monkeypatch):
    """The key cache as production runs it (a 5 s TTL), empty, with a clock the test moves."""
    settings.TANDEM_API_KEY_CACHE_TTL_S = 5.0
    now = [1000.0]
    monkeypatch.setattr(services.api_key_cache, "clock", lambda: now[0])
    services.api_key_cache.forget()
    yield now
    services.api_key_cache.forget()


def test_a_cached_key_is_checked_without_a_query(tenant, owner, key_cache, django_assert_num_queries):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_authenticate(raw_key=raw_key)  # reads the row (and writes last_used_at)
    with django_assert_num_queries(0):
        assert services.api_key_authenticate(raw_key=raw_key).pk == api_key.pk


def test_a_cached_key_stops_working_the_moment_it_is_revoked_in_this_process(tenant, owner, key_cache):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_authenticate(raw_key=raw_key)
    services.api_key_revoke(api_key=api_key, by=owner)
    with pytest.raises(errors.InvalidApiKey):
        services.api_key_authenticate(raw_key=raw_key)


def test_a_key_changed_in_the_admin_is_dropped_from_the_cache(tenant, owner, key_cache):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_authenticate(raw_key=raw_key)
    row = ApiKey.objects.get(pk=api_key.pk)
    row.revoked_at = timezone.now()
    row.save()  # as the admin's change form does: post_save drops the cached row
    with pytest.raises(errors.InvalidApiKey):
        services.api_key_authenticate(raw_key=raw_key)


def test_a_cached_key_stops_at_its_expiry_to_the_second(tenant, owner, key_cache, monkeypatch):
    expires = timezone.now() + timedelta(minutes=10)
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci", expires_at=expires)
    services.api_key_authenticate(raw_key=raw_key)
    monkeypatch.setattr(services.timezone, "now", lambda: expires)  # the cached row is still fresh
    with pytest.raises(errors.InvalidApiKey):
        services.api_key_authenticate(raw_key=raw_key)


def test_a_key_revoked_by_another_process_stops_here_within_the_cache_ttl(tenant, owner, key_cache):
    """The worst case the README states: another process's revocation is seen here within the TTL (5 s)."""
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    services.api_key_authenticate(raw_key=raw_key)
    # another process revokes it: this process gets no signal, only the row changes
    ApiKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())
    key_cache[0] += 4.9
    assert services.api_key_authenticate(raw_key=raw_key).pk == api_key.pk  # the window
    key_cache[0] += 0.2
    with pytest.raises(errors.InvalidApiKey):
        services.api_key_authenticate(raw_key=raw_key)


def test_unknown_keys_are_never_cached(tenant, owner, key_cache, django_assert_num_queries):
    _, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    unknown = raw_key[:-1] + ("A" if raw_key[-1] != "A" else "B")
    for _ in range(2):
        with django_assert_num_queries(1), pytest.raises(errors.InvalidApiKey):
            services.api_key_authenticate(raw_key=unknown)


def test_the_in_memory_check_accepts_only_what_the_full_check_would(tenant, owner, key_cache, monkeypatch):
    api_key, raw_key = services.api_key_create(tenant=tenant, created_by=owner, name="ci")
    assert services.api_key_authenticate_cached(raw_key=raw_key) is None  # not at hand yet
    services.api_key_authenticate(raw_key=raw_key)
    assert services.api_key_authenticate_cached(raw_key=raw_key).pk == api_key.pk
    assert services.api_key_authenticate_cached(raw_key=raw_key + "x") is None
    real_now = timezone.now
    later = real_now() + timedelta(minutes=2)
    monkeypatch.setattr(services.timezone, "now", lambda: later)
    assert services.api_key_authenticate_cached(raw_key=raw_key) is None  # last_used_at is due: the full check
    monkeypatch.setattr(services.timezone, "now", real_now)
    assert services.api_key_authenticate_cached(raw_key=raw_key).pk == api_key.pk
    services.api_key_revoke(api_key=api_key, by=owner)
    assert services.api_key_authenticate_cached(raw_key=raw_key) is None
