"""The console's team, invites, passwords and audit log: the invite flow end to end, the role rules, password change and
reset, and what each role and tenant sees."""

from __future__ import annotations

import re
import smtplib
import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.db import connections
from django.urls import reverse
from django.utils import timezone

from tenants import errors, services
from tenants.models import AuditEvent, Invite, Membership
from tenants.services import membership_create

pytestmark = pytest.mark.django_db

LINK_RE = re.compile(r"https?://testserver/invite/([A-Za-z0-9_-]{43})/")
NEW_PASSWORD = "a-new-passphrase-9876"


@pytest.fixture
def signed_in(client, account):
    client.force_login(account.user)
    return client


def member(account, django_user_model, role: str, name: str | None = None):
    user = django_user_model.objects.create_user(
        username=name or f"{role}-user", email=f"{name or role}@acme.invalid", password="pw-123456789"
    )
    membership_create(tenant=account.tenant, user=user, role=role)
    return user


def invite_via_console(client, email: str = "new@acme.invalid", role: str = "member") -> str:
    """Invite through the team page with no mail server: the link is on the page; return its token."""
    response = client.post(reverse("frontend:team"), {"email": email, "role": role})
    assert response.status_code == 200, response.content
    match = LINK_RE.search(response.content.decode())
    assert match, "the invite link is shown when no mail server is configured"
    return match[1]


@pytest.mark.parametrize("name", ["team", "audit", "operator-audit", "password-change"])
def test_the_pages_require_a_signed_in_user(client, name):
    response = client.get(reverse(f"frontend:{name}"))
    assert response.status_code == 302 and response.url.startswith(reverse("frontend:login"))


# inviting -----------------------------------------------------------------------------------------------
def test_without_a_mail_server_the_link_is_shown_once_and_nothing_is_sent(signed_in, account, settings):
    settings.EMAIL_HOST = ""
    token = invite_via_console(signed_in)
    assert mail.outbox == []
    invite = Invite.objects.get(email="new@acme.invalid")
    assert invite.token_hash == Invite.hash_token(token) and token not in invite.token_hash
    page = signed_in.get(reverse("frontend:team")).content.decode()
    assert "new@acme.invalid" in page and token not in page  # pending, and the link is not shown again


def test_with_a_mail_server_the_link_is_mailed_and_not_shown(signed_in, account, settings):
    settings.EMAIL_HOST = "smtp.example.invalid"
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    response = signed_in.post(reverse("frontend:team"), {"email": "new@acme.invalid", "role": "viewer"})
    assert response.status_code == 302
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["new@acme.invalid"]
    token = LINK_RE.search(mail.outbox[0].body)[1]
    assert Invite.objects.get(email="new@acme.invalid").token_hash == Invite.hash_token(token)
    assert token not in signed_in.get(reverse("frontend:team")).content.decode()


def test_when_the_mail_server_refuses_the_link_is_shown_instead(signed_in, settings, monkeypatch):
    settings.EMAIL_HOST = "smtp.example.invalid"

    def refuse(*args, **kwargs):
        raise smtplib.SMTPRecipientsRefused({"new@acme.invalid": (550, b"no such user")})

    monkeypatch.setattr("frontend.team.send_mail", refuse)
    response = signed_in.post(reverse("frontend:team"), {"email": "new@acme.invalid", "role": "member"})
    assert response.status_code == 200 and b"refused the invite" in response.content
    token = LINK_RE.search(response.content.decode())[1]
    assert Invite.objects.get(email="new@acme.invalid").token_hash == Invite.hash_token(token)


def test_a_new_person_creates_an_account_and_joins_with_the_role(client, signed_in, account):
    token = invite_via_console(signed_in, role="viewer")
    client.logout()
    url = reverse("frontend:invite-accept", args=[token])
    page = client.get(url)
    assert page.status_code == 200 and b"Acme" in page.content and b"viewer" in page.content
    response = client.post(url, {"username": "newbie", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302
    joined = Membership.objects.get(tenant=account.tenant, user__username="newbie")
    assert joined.role == "viewer" and joined.user.email == "new@acme.invalid"
    assert joined.user.check_password(NEW_PASSWORD)
    assert client.get(reverse("frontend:usage")).status_code == 200  # signed in, in Acme
    event = AuditEvent.objects.get(action="invite.accept")
    assert event.actor_user_id == joined.user_id and NEW_PASSWORD not in str(event.changes)


def test_a_signed_in_user_accepts_with_one_click(client, signed_in, account, other_account):
    token = invite_via_console(signed_in, email="globex@globex.invalid", role="admin")
    client.force_login(other_account.user)
    url = reverse("frontend:invite-accept", args=[token])
    assert b"Join Acme as admin" in client.get(url).content
    assert client.post(url).status_code == 302
    assert Membership.objects.get(tenant=account.tenant, user=other_account.user).role == "admin"
    # the invite was for Acme only: nothing changes in Globex
    assert Membership.objects.filter(tenant=other_account.tenant).count() == 1


def test_a_link_used_once_is_refused_the_second_time(client, signed_in, account, django_user_model):
    token = invite_via_console(signed_in)
    client.logout()
    url = reverse("frontend:invite-accept", args=[token])
    client.post(url, {"username": "first", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    client.logout()
    again = client.post(url, {"username": "second", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert again.status_code == 410 and b"used" in again.content
    assert not django_user_model.objects.filter(username="second").exists()
    with pytest.raises(errors.InvalidInput, match="used"):
        services.invite_accept(raw_token=token, user=django_user_model.objects.create_user(username="third"))


def test_an_expired_or_revoked_link_is_refused(client, signed_in, account, django_user_model):
    expired = invite_via_console(signed_in, email="late@acme.invalid")
    Invite.objects.filter(email="late@acme.invalid").update(expires_at=timezone.now() - timedelta(seconds=1))
    revoked = invite_via_console(signed_in, email="gone@acme.invalid")
    invite = Invite.objects.get(email="gone@acme.invalid")
    assert signed_in.post(reverse("frontend:invite-revoke", args=[invite.pk])).status_code == 302
    client.logout()
    for token, word in ((expired, b"expired"), (revoked, b"revoked")):
        url = reverse("frontend:invite-accept", args=[token])
        response = client.post(url, {"username": "late", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
        assert response.status_code == 410 and word in response.content
    assert not django_user_model.objects.filter(username="late").exists()


def test_an_unknown_link_or_the_stored_hash_is_not_found(client, signed_in):
    token = invite_via_console(signed_in)
    stored = Invite.objects.get().token_hash
    client.logout()
    for wrong in (stored, token[:-1] + ("A" if token[-1] != "A" else "B")):
        response = client.get(reverse("frontend:invite-accept", args=[wrong]))
        assert response.status_code == 404 and b"Acme" not in response.content


def test_an_invite_expires_after_seven_days(account):
    invite, _ = services.invite_create(tenant=account.tenant, email="x@acme.invalid", role="member", by=account.user)
    assert timedelta(days=7) - timedelta(seconds=5) < invite.expires_at - invite.created_at <= timedelta(days=7)


def test_another_tenants_invite_cannot_be_revoked_and_its_members_cannot_be_touched(signed_in, other_account):
    invite, _ = services.invite_create(
        tenant=other_account.tenant, email="g@globex.invalid", role="member", by=other_account.user
    )
    theirs = Membership.objects.get(tenant=other_account.tenant)
    assert signed_in.post(reverse("frontend:invite-revoke", args=[invite.pk])).status_code == 404
    assert signed_in.post(reverse("frontend:member-role", args=[theirs.pk]), {"role": "viewer"}).status_code == 404
    assert signed_in.post(reverse("frontend:member-remove", args=[theirs.pk])).status_code == 404
    assert Invite.objects.get(pk=invite.pk).revoked_at is None
    assert Membership.objects.get(pk=theirs.pk).role == "owner"


# role rules ---------------------------------------------------------------------------------------------
def test_the_last_owner_can_be_neither_demoted_nor_removed(signed_in, account):
    mine = Membership.objects.get(tenant=account.tenant, user=account.user)
    signed_in.post(reverse("frontend:member-role", args=[mine.pk]), {"role": "admin"})
    signed_in.post(reverse("frontend:member-remove", args=[mine.pk]))
    assert Membership.objects.get(pk=mine.pk).role == "owner"
    page = signed_in.get(reverse("frontend:team")).content.decode()
    assert "at least one owner" in page
    with pytest.raises(errors.InvalidInput, match="at least one owner"):
        services.membership_remove(membership=mine, by=account.user)


def test_with_a_second_owner_an_owner_may_step_down(signed_in, account, django_user_model):
    other = member(account, django_user_model, "owner", "co-owner")
    mine = Membership.objects.get(tenant=account.tenant, user=account.user)
    assert signed_in.post(reverse("frontend:member-role", args=[mine.pk]), {"role": "admin"}).status_code == 302
    assert Membership.objects.get(pk=mine.pk).role == "admin"
    # now an admin: the co-owner is out of reach
    theirs = Membership.objects.get(tenant=account.tenant, user=other)
    assert signed_in.post(reverse("frontend:member-role", args=[theirs.pk]), {"role": "member"}).status_code == 403


def test_an_admin_cannot_make_or_unmake_owners(client, account, django_user_model):
    admin = member(account, django_user_model, "admin")
    plain = member(account, django_user_model, "member")
    client.force_login(admin)
    target = Membership.objects.get(tenant=account.tenant, user=plain)
    assert client.post(reverse("frontend:member-role", args=[target.pk]), {"role": "owner"}).status_code == 403
    owner = Membership.objects.get(tenant=account.tenant, user=account.user)
    assert client.post(reverse("frontend:member-remove", args=[owner.pk])).status_code == 403
    assert client.post(reverse("frontend:team"), {"email": "o@acme.invalid", "role": "owner"}).status_code == 400
    with pytest.raises(errors.PermissionDenied):
        services.invite_create(tenant=account.tenant, email="o@acme.invalid", role="owner", by=admin)
    # but an admin manages members and admins
    assert client.post(reverse("frontend:member-role", args=[target.pk]), {"role": "viewer"}).status_code == 302
    assert Membership.objects.get(pk=target.pk).role == "viewer"
    assert client.post(reverse("frontend:member-remove", args=[target.pk])).status_code == 302
    assert not Membership.objects.filter(pk=target.pk).exists()
    assert Membership.objects.get(pk=owner.pk).role == "owner"


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_see_the_team_read_only(client, account, django_user_model, role):
    user = member(account, django_user_model, role)
    client.force_login(user)
    page = client.get(reverse("frontend:team")).content.decode()
    assert account.user.username in page and "Invite someone" not in page and "Change role" not in page
    assert client.post(reverse("frontend:team"), {"email": "x@acme.invalid", "role": "member"}).status_code == 403
    owner = Membership.objects.get(tenant=account.tenant, user=account.user)
    assert client.post(reverse("frontend:member-role", args=[owner.pk]), {"role": "viewer"}).status_code == 403
    assert client.get(reverse("frontend:audit")).status_code == 403
    assert not Invite.objects.exists()


def test_a_member_may_leave(client, account, django_user_model):
    user = member(account, django_user_model, "member")
    client.force_login(user)
    mine = Membership.objects.get(tenant=account.tenant, user=user)
    assert client.post(reverse("frontend:member-remove", args=[mine.pk])).status_code == 302
    assert not Membership.objects.filter(pk=mine.pk).exists()
    assert AuditEvent.objects.get(action="member.remove").actor_user_id == user.pk


def _at_once(*calls):
    """Run each call in its own thread (its own connection), released together; each result or exception."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the test inspects every outcome
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck (deadlock?)"
    return results


@pytest.mark.django_db(transaction=True)
def test_two_owners_demoting_each_other_at_once_leave_one_owner(django_user_model):
    """The tenant row lock orders the two (on SQLite the whole database is that lock; on PostgreSQL the row)."""
    first = django_user_model.objects.create_user(username="first")
    second = django_user_model.objects.create_user(username="second")
    tenant = services.tenant_create(name="Duo", owner=first)
    membership_create(tenant=tenant, user=second, role="owner")
    mine, theirs = (Membership.objects.get(tenant=tenant, user=u) for u in (first, second))
    results = _at_once(
        lambda: services.membership_role_set(membership=theirs, role="member", by=first),
        lambda: services.membership_role_set(membership=mine, role="member", by=second),
    )
    refused = [r for r in results if isinstance(r, errors.TenantsError)]
    assert len(refused) == 1, results  # the second is refused: by then it is the last owner, or no longer an owner
    assert Membership.objects.filter(tenant=tenant, role="owner").count() == 1


@pytest.mark.django_db(transaction=True)
def test_one_invite_accepted_twice_at_once_joins_one_person(django_user_model):
    owner = django_user_model.objects.create_user(username="owner")
    tenant = services.tenant_create(name="Once", owner=owner)
    _, token = services.invite_create(tenant=tenant, email="x@once.invalid", role="member", by=owner)
    people = [django_user_model.objects.create_user(username=f"p{n}") for n in range(2)]
    results = _at_once(*(lambda user=user: services.invite_accept(raw_token=token, user=user) for user in people))
    assert sum(isinstance(r, Membership) for r in results) == 1, results
    assert Membership.objects.filter(tenant=tenant).count() == 2  # the owner and one newcomer
    assert AuditEvent.objects.filter(action="invite.accept").count() == 1


# passwords ----------------------------------------------------------------------------------------------
def test_a_signed_in_user_changes_their_password(signed_in, account):
    url = reverse("frontend:password-change")
    wrong = signed_in.post(url, {"old_password": "nope", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert wrong.status_code == 200 and b"field-error" in wrong.content
    response = signed_in.post(
        url, {"old_password": account.password, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    )
    assert response.status_code == 302
    account.user.refresh_from_db()
    assert account.user.check_password(NEW_PASSWORD)
    assert signed_in.get(reverse("frontend:usage")).status_code == 200  # still signed in here


def test_without_a_mail_server_the_reset_page_says_so_and_sends_nothing(client, account, settings):
    settings.EMAIL_HOST = ""
    account.user.email = "acme@acme.invalid"
    account.user.save()
    page = client.get(reverse("frontend:password-reset"))
    assert page.status_code == 200 and b"no mail server configured" in page.content
    response = client.post(reverse("frontend:password-reset"), {"email": "acme@acme.invalid"})
    assert response.status_code == 503 and b"no mail server configured" in response.content
    assert mail.outbox == []


def test_a_forgotten_password_is_reset_by_mail_once(client, account, settings):
    settings.EMAIL_HOST = "smtp.example.invalid"
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    account.user.email = "acme@acme.invalid"
    account.user.save()
    response = client.post(reverse("frontend:password-reset"), {"email": "acme@acme.invalid"})
    assert response.status_code == 302 and response.url == reverse("frontend:password-reset-done")
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["acme@acme.invalid"]
    link = re.search(r"http://testserver(/password/reset/[^/\s]+/[^/\s]+/)", mail.outbox[0].body)[1]
    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200 and b"Choose a new password" in form_page.content
    set_url = form_page.redirect_chain[-1][0]
    done = client.post(set_url, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
    assert done.status_code == 302 and done.url == reverse("frontend:password-reset-complete")
    account.user.refresh_from_db()
    assert account.user.check_password(NEW_PASSWORD)
    assert client.get(link).status_code == 404  # used: the link no longer works


def test_a_reset_for_an_unknown_address_sends_nothing_and_says_the_same(client, settings):
    settings.EMAIL_HOST = "smtp.example.invalid"
    response = client.post(reverse("frontend:password-reset"), {"email": "nobody@nowhere.invalid"})
    assert response.status_code == 302 and mail.outbox == []


# the audit log in the console ---------------------------------------------------------------------------
def test_console_actions_are_audited_with_the_signed_in_user(signed_in, account):
    signed_in.post(reverse("frontend:api-keys"), {"name": "from the console"})
    signed_in.post(reverse("frontend:limits"), {"target": "tenant", "requests_per_minute": "90"})
    for action in ("api_key.create", "limits.set"):
        event = AuditEvent.objects.filter(action=action).latest("id")
        assert event.actor_user_id == account.user.pk and event.tenant_id == account.tenant.pk


def test_the_audit_page_lists_filters_and_pages_the_tenants_events(signed_in, account, other_account):
    for n in range(55):
        services.rate_limits_set(
            target=account.tenant, max_streams=n + 1, requests_per_minute=None, tokens_per_minute=None, by=account.user
        )
    services.api_key_create(tenant=other_account.tenant, created_by=other_account.user, name="globex secret project")
    url = reverse("frontend:audit")
    page = signed_in.get(url).content.decode()
    assert "limits.set" in page and "Page 1 of 2" in page and "globex" not in page.lower()
    assert "Page 2 of 2" in signed_in.get(url, {"page": 2}).content.decode()
    only_keys = signed_in.get(url, {"action": "api_key.create"}).content.decode()
    assert "acme key" in only_keys and "limits.set</td>" not in only_keys
    assert "No events" in signed_in.get(url, {"actor": "someone-else"}).content.decode()


def test_operators_see_every_tenants_events_and_filter_by_tenant(client, account, other_account, admin_user):
    client.force_login(admin_user)
    url = reverse("frontend:operator-audit")
    page = client.get(url).content.decode()
    assert "Acme" in page and "Globex" in page and "price_book.publish" in page
    only_globex = client.get(url, {"tenant": str(other_account.tenant.pk)}).content.decode()
    assert "globex key" in only_globex and "acme key" not in only_globex
    platform = client.get(url, {"tenant": "platform"}).content.decode()
    assert "price_book.publish</td>" in platform and "api_key.create</td>" not in platform


def test_the_operators_page_is_for_staff_only(signed_in):
    assert signed_in.get(reverse("frontend:operator-audit")).status_code == 403


def test_a_member_of_one_tenant_never_sees_anothers_team_invites_or_events(signed_in, account, other_account):
    services.invite_create(
        tenant=other_account.tenant, email="hidden@globex.invalid", role="member", by=other_account.user
    )
    for name in ("team", "audit"):
        page = signed_in.get(reverse(f"frontend:{name}")).content.decode().lower()
        assert "hidden@globex.invalid" not in page and "globex" not in page
