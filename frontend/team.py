"""The console's people and history: the team (members, roles, invites), accepting an invite, and the audit log.

Thin views over ``tenants.services`` (which decide who may do what and write the audit
events) and ``tenants.selectors``; their forms live here too. An invite's link carries a
one-time token that only its hash is stored for: it is shown once, in the response to the
invite, when no mail server is configured (``EMAIL_HOST`` empty), and mailed otherwise.
"""

from __future__ import annotations

import logging
import smtplib

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import PermissionDenied
from django.core.mail import send_mail
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from frontend.views import SESSION_TENANT_KEY, _render, current_membership, in_tenant
from tenants import errors as tenant_errors
from tenants import selectors, services
from tenants.models import AuditEvent, Invite, Membership, MembershipRole

logger = logging.getLogger(__name__)

AUDIT_PAGE_SIZE = 50


def mail_configured() -> bool:
    """Whether a mail server is configured: without one, nothing pretends to send mail."""
    return bool(settings.EMAIL_HOST)


# forms -------------------------------------------------------------------------------------------------
def _role_choices(*, owner: bool) -> list[tuple[str, str]]:
    # Only an owner may make owners: an admin is not even offered the choice (the service refuses it too).
    return [(value, label) for value, label in MembershipRole.choices if owner or value != MembershipRole.OWNER]


class InviteForm(forms.Form):
    email = forms.EmailField(max_length=254, help_text="The invite link goes to this address (or is shown here).")
    role = forms.ChoiceField(initial=MembershipRole.MEMBER)

    def __init__(self, *args, owner: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = _role_choices(owner=owner)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=MembershipRole.choices)


class InviteSignupForm(UserCreationForm):
    """A new account for an invitee: username and password twice (Django's password validators run)."""


# the team ----------------------------------------------------------------------------------------------
@never_cache
@require_http_methods(["GET", "POST"])
@login_required
@in_tenant
def team(request: HttpRequest, membership: Membership) -> HttpResponse:
    """The tenant's members and pending invites; owners and admins invite (a POST), change roles and remove.

    The invite link is rendered into the response to the POST only (``never_cache``), as a
    new API key is: nothing keeps the token, so a reload cannot show it again.
    """
    is_owner = membership.role == MembershipRole.OWNER
    form = InviteForm(request.POST or None, owner=is_owner) if membership.can_manage else None
    link = invite = None
    status = 200
    if request.method == "POST":
        if form is None:
            raise PermissionDenied("only owners and admins invite people")
        if form.is_valid():
            try:
                invite, raw_token = services.invite_create(
                    tenant=membership.tenant,
                    email=form.cleaned_data["email"],
                    role=form.cleaned_data["role"],
                    by=request.user,
                )
            except (tenant_errors.PermissionDenied, tenant_errors.NotAMember) as exc:
                raise PermissionDenied(exc.message) from None
            except tenant_errors.InvalidInput as exc:
                form.add_error(None, exc.message)
                status = 400
            else:
                link = request.build_absolute_uri(reverse("frontend:invite-accept", args=[raw_token]))
                if mail_configured() and _invite_mail_send(invite, link, request.user):
                    messages.success(request, f"Sent an invite to {invite.email}: its link works once, for 7 days.")
                    return redirect("frontend:team")
                form = InviteForm(owner=is_owner)
        else:
            status = 400
    context = {
        "rows": _member_rows(membership),
        "invites": selectors.invites_pending(tenant=membership.tenant),
        "form": form,
        "link": link,
        "invite": invite,
        "mail_configured": mail_configured(),
    }
    return _render(request, "frontend/team.html", membership, context, status=status)


def _member_rows(viewer: Membership) -> list[dict]:
    is_owner = viewer.role == MembershipRole.OWNER
    rows = []
    for m in selectors.memberships_of_tenant(tenant=viewer.tenant):
        # what the services would allow: the page offers nothing they refuse (the last owner aside, which they explain)
        may_touch = viewer.can_manage and (is_owner or m.role != MembershipRole.OWNER)
        rows.append(
            {
                "membership": m,
                "is_self": m.user_id == viewer.user_id,
                "can_change_role": may_touch,
                "role_choices": _role_choices(owner=is_owner),
                "can_remove": may_touch or m.user_id == viewer.user_id,
            }
        )
    return rows


def _invite_mail_send(invite: Invite, link: str, by) -> bool:
    """Mail the invite's link; False (logged, and the console shows the link instead) when the server refuses it."""
    body = (
        f"{by.get_username()} invited you to join {invite.tenant.name} on Tandem as {invite.role}.\n\n"
        f"Open this link to accept (it works once, until {invite.expires_at:%Y-%m-%d %H:%M} UTC):\n{link}\n"
    )
    try:
        send_mail(f"Join {invite.tenant.name} on Tandem", body, None, [invite.email])
    except (smtplib.SMTPException, OSError):
        logger.exception("the invite mail could not be sent", extra={"invite_id": invite.pk})
        return False
    return True


def _team_membership(viewer: Membership, pk: int) -> Membership:
    # Scoped to the current tenant: another tenant's membership id is simply not found.
    try:
        return selectors.memberships_of_tenant(tenant=viewer.tenant).get(pk=pk)
    except Membership.DoesNotExist:
        raise Http404("no such member in this tenant") from None


@require_POST
@login_required
@in_tenant
def member_role(request: HttpRequest, membership: Membership, pk: int) -> HttpResponse:
    target = _team_membership(membership, pk)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick one of the roles.")
        return redirect("frontend:team")
    try:
        services.membership_role_set(membership=target, role=form.cleaned_data["role"], by=request.user)
    except (tenant_errors.PermissionDenied, tenant_errors.NotAMember) as exc:
        raise PermissionDenied(exc.message) from None
    except tenant_errors.InvalidInput as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{target.user.get_username()} is now {target.role}.")
    return redirect("frontend:team")


@require_POST
@login_required
@in_tenant
def member_remove(request: HttpRequest, membership: Membership, pk: int) -> HttpResponse:
    target = _team_membership(membership, pk)
    try:
        services.membership_remove(membership=target, by=request.user)
    except (tenant_errors.PermissionDenied, tenant_errors.NotAMember) as exc:
        raise PermissionDenied(exc.message) from None
    except tenant_errors.InvalidInput as exc:
        messages.error(request, exc.message)
        return redirect("frontend:team")
    if target.user_id == request.user.pk:
        request.session.pop(SESSION_TENANT_KEY, None)
        messages.success(request, f"You left {membership.tenant.name}.")
        return redirect("frontend:playground")
    messages.success(request, f"Removed {target.user.get_username()} from {membership.tenant.name}.")
    return redirect("frontend:team")


@require_POST
@login_required
@in_tenant
def invite_revoke(request: HttpRequest, membership: Membership, pk: int) -> HttpResponse:
    try:
        invite = selectors.invites_pending(tenant=membership.tenant).get(pk=pk)
    except Invite.DoesNotExist:
        raise Http404("no such pending invite in this tenant") from None
    try:
        services.invite_revoke(invite=invite, by=request.user)
    except (tenant_errors.PermissionDenied, tenant_errors.NotAMember) as exc:
        raise PermissionDenied(exc.message) from None
    messages.success(request, f"Revoked the invite of {invite.email}: its link no longer works.")
    return redirect("frontend:team")


# accepting an invite -----------------------------------------------------------------------------------
@never_cache
@require_http_methods(["GET", "POST"])
def invite_accept(request: HttpRequest, token: str) -> HttpResponse:
    """The invite link: a signed-in user joins with one click; anyone else creates an account (or signs in first).

    An unknown token is a 404 that says nothing more; a used, revoked or expired one is a
    410 that says which (whoever holds the link already knows the invite exists).
    """
    invite = selectors.invite_by_token(raw_token=token)
    membership = current_membership(request) if request.user.is_authenticated else None
    context: dict = {"invite": invite, "token": token, "form": None, "error": None, "blocked": True}
    if invite is None:
        context["error"] = "This invite link is not valid. Ask whoever invited you for a new one."
        return _render(request, "frontend/invite_accept.html", membership, context, status=404)
    state = invite.state_at(timezone.now())
    if state != "pending":
        what = "used" if state == "accepted" else state
        context["error"] = f"This invite was {what}. Ask whoever invited you for a new one."
        return _render(request, "frontend/invite_accept.html", membership, context, status=410)
    context["blocked"] = False
    status = 200
    if request.user.is_authenticated:
        if request.method == "POST":
            try:
                joined = services.invite_accept(raw_token=token, user=request.user)
            except tenant_errors.InvalidInput as exc:
                context["error"] = exc.message
                status = 400
            else:
                return _joined(request, joined)
    else:
        form = InviteSignupForm(request.POST or None)
        context["form"] = form
        if request.method == "POST":
            if form.is_valid():
                try:
                    joined = services.invite_accept_signup(
                        raw_token=token,
                        username=form.cleaned_data["username"],
                        password=form.cleaned_data["password1"],
                    )
                except tenant_errors.InvalidInput as exc:
                    form.add_error(None, exc.message)
                    status = 400
                else:
                    login(request, joined.user, backend=settings.AUTHENTICATION_BACKENDS[0])
                    return _joined(request, joined)
            else:
                status = 400
        context["signin_url"] = f"{reverse('frontend:login')}?{urlencode({'next': request.path})}"
    return _render(request, "frontend/invite_accept.html", membership, context, status=status)


def _joined(request: HttpRequest, joined: Membership) -> HttpResponse:
    request.session[SESSION_TENANT_KEY] = joined.tenant_id
    messages.success(request, f"Welcome to {joined.tenant.name}: you joined as {joined.role}.")
    return redirect("frontend:playground")


# the audit log -----------------------------------------------------------------------------------------
@require_GET
@login_required
@in_tenant
def audit(request: HttpRequest, membership: Membership) -> HttpResponse:
    """The tenant's audit log for its owners and admins: newest first, filtered by action and actor, paged."""
    if not membership.can_manage:
        raise PermissionDenied("only owners and admins see the audit log")
    action, actor = request.GET.get("action", ""), request.GET.get("actor", "")
    events = selectors.audit_events_for_tenant(tenant=membership.tenant, action=action, actor=actor)
    context = {
        "page": Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page")),
        "actions": AuditEvent.Action.values,
        "actors": selectors.audit_actors_for_tenant(tenant=membership.tenant),
        "filters": {"action": action, "actor": actor},
        "operator": False,
    }
    return _render(request, "frontend/audit.html", membership, context)


@require_GET
@login_required
def operator_audit(request: HttpRequest) -> HttpResponse:
    """Every tenant's audit log and the platform's (price books, upstreams, default policies): for operators (staff)."""
    if not request.user.is_staff:
        raise PermissionDenied("only operators see every tenant's audit log")
    tenant, action, actor = (request.GET.get(name, "") for name in ("tenant", "action", "actor"))
    events = selectors.audit_events_all(tenant=tenant, action=action, actor=actor)
    context = {
        "page": Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page")),
        "actions": AuditEvent.Action.values,
        "tenants": selectors.tenants_all(),
        "platform": selectors.AUDIT_PLATFORM,
        "filters": {"tenant": tenant, "action": action, "actor": actor},
        "operator": True,
    }
    return _render(request, "frontend/audit.html", current_membership(request), context)
