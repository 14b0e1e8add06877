"""Tenants and memberships: who owns what, and what each role may do."""

from __future__ import annotations

import pytest

from tenants import errors, selectors, services
from tenants.models import Membership

pytestmark = pytest.mark.django_db


def test_a_new_tenant_is_owned_by_its_creator(tenant, owner):
    membership = selectors.membership_get(user=owner, tenant_id=tenant.pk)
    assert membership.role == Membership.Role.OWNER
    assert tenant.slug == "acme"


def test_slugs_made_from_names_are_unique(owner):
    second = services.tenant_create(name="Acme", owner=owner)
    third = services.tenant_create(name="Acme", owner=owner)
    assert (second.slug, third.slug) == ("acme", "acme-2")
    assert services.tenant_create(name="Ünïcode & Co!", owner=owner).slug == "unicode-co"


def test_a_taken_slug_is_refused(tenant, owner):
    with pytest.raises(errors.InvalidInput, match="taken"):
        services.tenant_create(name="Other", owner=owner, slug="acme")


def test_a_member_is_added_once(tenant, make_user):
    user = make_user()
    services.membership_create(tenant=tenant, user=user, role="member")
    with pytest.raises(errors.InvalidInput, match="already a member"):
        services.membership_create(tenant=tenant, user=user, role="admin")


def test_unknown_roles_are_refused(tenant, make_user):
    with pytest.raises(errors.InvalidInput, match="unknown role"):
        services.membership_create(tenant=tenant, user=make_user(), role="superuser")


@pytest.mark.parametrize(
    ("role", "manage", "complete"),
    [("owner", True, True), ("admin", True, True), ("member", False, True), ("viewer", False, False)],
)
def test_what_each_role_may_do(role, manage, complete):
    membership = Membership(role=role)
    assert (membership.can_manage, membership.can_complete) == (manage, complete)


def test_membership_get_refuses_other_tenants(tenant, other_tenant, owner):
    with pytest.raises(errors.NotAMember):
        selectors.membership_get(user=owner, tenant_id=other_tenant.pk)


def test_membership_get_refuses_a_tenant_that_does_not_exist_the_same_way(owner):
    with pytest.raises(errors.NotAMember, match="^not a member of this tenant$"):
        selectors.membership_get(user=owner, tenant_id=999_999)


def test_anonymous_users_are_members_of_nothing(tenant):
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(errors.NotAMember):
        selectors.membership_get(user=AnonymousUser(), tenant_id=tenant.pk)


def test_memberships_for_user_lists_only_theirs(tenant, other_tenant, owner):
    second = services.tenant_create(name="Beta", owner=owner)
    assert [m.tenant for m in selectors.memberships_for_user(user=owner)] == [tenant, second]
