"""The console's pages: thin views over the tenants services and selectors and the engine registry.

Every page but sign-in needs a signed-in user, and acts in the *current tenant*: the one
stored in the session by the tenant switch, re-checked against the user's memberships on
every request (a membership removed meanwhile falls back to the user's first tenant).
Completions themselves never go through these views: the playground streams them over
the websocket (``inference.consumers``), which checks the tenant again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from frontend.forms import ApiKeyCreateForm, CloudUpstreamForm, RateLimitsForm, RoutingPolicyForm
from inference import selectors as inference_selectors
from inference import services as inference_services
from inference.cache import exact_cache
from inference.engines import get_engines
from inference.errors import InvalidRequest
from inference.limits import Limits, default_limits
from inference.queueing import scheduler
from inference.routing import WEBSOCKET_PATH
from inference.services import POLICY_FIELDS
from tenants import errors as tenant_errors
from tenants import selectors, services
from tenants.models import ApiKey, Membership, Tenant
from tenants.tiers import Tier

SESSION_TENANT_KEY = "tandem_tenant_id"
USAGE_ROWS = 50


def current_membership(request: HttpRequest) -> Membership | None:
    """The user's membership in the tenant they work in now; None when they belong to no tenant."""
    tenant_id = request.session.get(SESSION_TENANT_KEY)
    if tenant_id is not None:
        try:
            return selectors.membership_get(user=request.user, tenant_id=tenant_id)
        except tenant_errors.NotAMember:
            del request.session[SESSION_TENANT_KEY]
    return selectors.memberships_for_user(user=request.user).first()


def _render(request: HttpRequest, template: str, membership: Membership | None, context: dict, **kwargs):
    """A console page: the header's tenant switch needs every membership and the current one."""
    memberships = list(selectors.memberships_for_user(user=request.user))
    page = {"memberships": memberships, "membership": membership, "tenant": membership and membership.tenant}
    return render(request, template, {**page, **context}, **kwargs)


def _no_tenant(request: HttpRequest) -> HttpResponse:
    return _render(request, "frontend/no_tenant.html", None, {}, status=403)


def in_tenant(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Call ``view(request, membership, ...)`` in the current tenant; a user with none gets the no-tenant page."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        membership = current_membership(request)
        if membership is None:
            return _no_tenant(request)
        return view(request, membership, *args, **kwargs)

    return wrapped


@require_GET
@login_required
@in_tenant
def playground(request: HttpRequest, membership: Membership) -> HttpResponse:
    engines = get_engines()
    models = sorted(engines.models.values(), key=lambda entry: entry.name)
    context = {"models": models, "websocket_path": "/" + WEBSOCKET_PATH, "health": tier_health(membership.tenant_id)}
    return _render(request, "frontend/playground.html", membership, context)


def tier_health(tenant_id: int) -> list[dict]:
    """Each tier of each model this tenant may use, with its breaker's state (the verifier's, each upstream's)."""
    engines = get_engines()
    if engines.upstreams is not None and engines.upstreams.stale():
        engines.upstreams.refresh()
    rows = []
    for entry in sorted(engines.models.values(), key=lambda e: e.name):
        if entry.edge is not None:
            rows.append({"tier": "edge", "what": f"{entry.name}: draft model, in this process", "state": "closed"})
        breaker = entry.breaker(Tier.SPECULATIVE)
        if entry.speculative is not None and breaker is not None:
            rows.append({"tier": "speculative", "what": f"{entry.name}: draft + verifier", **breaker.snapshot()})
    if engines.upstreams is not None:
        for upstream in engines.upstreams.snapshot(tenant_id):
            what = f"{upstream['model']}: {upstream['name']} ({upstream['upstream_model']})"
            rows.append({"tier": "cloud", "what": what, "note": upstream["note"], **upstream["breaker"]})
    return rows


@require_POST
@login_required
def tenant_switch(request: HttpRequest) -> HttpResponse:
    try:
        membership = selectors.membership_get(user=request.user, tenant_id=int(request.POST.get("tenant", "")))
    except (ValueError, tenant_errors.NotAMember):
        raise PermissionDenied("you are not a member of that tenant") from None
    request.session[SESSION_TENANT_KEY] = membership.tenant_id
    messages.success(request, f"Now working in {membership.tenant.name}.")
    next_url = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        next_url = reverse("frontend:playground")
    return redirect(next_url)


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
@in_tenant
def api_keys(request: HttpRequest, membership: Membership) -> HttpResponse:
    """List the tenant's keys; a POST creates one and shows its full text once, in this response only.

    The raw key is rendered into the response to the POST and kept nowhere (not in the
    session, not in a message), so a reload cannot show it again; ``never_cache`` keeps
    it out of the browser's and proxies' caches.
    """
    form = ApiKeyCreateForm(request.POST or None) if membership.can_complete else None
    created = raw_key = None
    status = 200
    if request.method == "POST":
        if form is None:
            raise PermissionDenied("viewers cannot create API keys")
        if form.is_valid():
            try:
                created, raw_key = services.api_key_create(
                    tenant=membership.tenant,
                    created_by=request.user,
                    name=form.cleaned_data["name"],
                    scopes=form.cleaned_data["scopes"],
                    expires_at=form.expires_at,
                )
            except tenant_errors.PermissionDenied as exc:
                raise PermissionDenied(exc.message) from None
            except tenant_errors.InvalidInput as exc:
                form.add_error(None, exc.message)
                status = 400
            else:
                form = ApiKeyCreateForm()
        else:
            status = 400
    now = timezone.now()
    keys = [
        {
            "key": key,
            "state": "revoked" if key.revoked_at else "active" if key.is_usable_at(now) else "expired",
            "can_revoke": key.revoked_at is None and membership.can_manage_key(key),
        }
        for key in selectors.api_keys_for_tenant(tenant=membership.tenant)
    ]
    context = {"keys": keys, "form": form, "created": created, "raw_key": raw_key}
    return _render(request, "frontend/api_keys.html", membership, context, status=status)


@require_POST
@login_required
@in_tenant
def api_key_revoke(request: HttpRequest, membership: Membership, pk: int) -> HttpResponse:
    # Scoped to the current tenant: another tenant's key id is simply not found.
    try:
        key = selectors.api_keys_for_tenant(tenant=membership.tenant).get(pk=pk)
    except ApiKey.DoesNotExist:
        raise Http404("no such key in this tenant") from None
    try:
        services.api_key_revoke(api_key=key, by=request.user)
    except (tenant_errors.PermissionDenied, tenant_errors.NotAMember) as exc:
        raise PermissionDenied(exc.message) from None
    messages.success(request, f"Revoked {key.prefix} ({key.name}). Requests with it now fail.")
    return redirect("frontend:api-keys")


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
@in_tenant
def limits(request: HttpRequest, membership: Membership) -> HttpResponse:
    """The tenant's and its keys' rate limits in force, the queue now, and (owners and admins) a form per level."""
    tenant = membership.tenant
    keys = list(selectors.api_keys_for_tenant(tenant=tenant).filter(revoked_at__isnull=True))
    status = 200
    posted = RateLimitsForm(request.POST) if request.method == "POST" else None
    if posted is not None:
        if not membership.can_manage:
            raise PermissionDenied("only owners and admins can change rate limits")
        target: Tenant | ApiKey | None = None
        if posted.is_valid():
            wanted = posted.cleaned_data["target"]
            target = tenant if wanted == "tenant" else next((k for k in keys if str(k.pk) == wanted), None)
            if target is None:
                raise Http404("no such key in this tenant")
            values = {name: posted.cleaned_data[name] for name in services.RATE_LIMIT_FIELDS}
            try:
                services.rate_limits_set(target=target, by=request.user, **values)
            except tenant_errors.InvalidInput as exc:
                posted.add_error(None, exc.message)
            else:
                messages.success(request, f"Rate limits of {target} saved; new requests use them at once.")
                return redirect("frontend:limits")
        status = 400
    defaults = default_limits()
    levels: list[tuple[str, str, Tenant | ApiKey, Limits | None]] = [
        ("tenant", f"{tenant.name} (the tenant)", tenant, defaults)
    ]
    levels += [(str(k.pk), f"{k.name} ({k.prefix})", k, None) for k in keys]
    rows = []
    for target_id, label, obj, fallback in levels:
        values = {name: getattr(obj, name) for name in services.RATE_LIMIT_FIELDS}
        bound = posted if posted is not None and posted.data.get("target") == target_id else None
        form = bound or RateLimitsForm(initial={"target": target_id, **values})
        cells = [
            (value, "") if value is not None else (getattr(fallback, name), "default") if fallback else (None, "")
            for name, value in values.items()
        ]
        rows.append({"id": target_id, "label": label, "cells": cells, "form": form})
    queue = [
        {"pool": name, "running": pool.running_for(tenant.pk), "waiting": pool.waiting(tenant.pk)}
        for name, pool in sorted(scheduler.pools().items())
    ]
    context = {"rows": rows, "defaults": defaults, "queue": queue, "queue_settings": _queue_settings()}
    return _render(request, "frontend/limits.html", membership, context, status=status)


def _queue_settings() -> dict:
    return {
        "interactive_deadline_s": settings.TANDEM_QUEUE_DEADLINE_S["interactive"],
        "batch_deadline_s": settings.TANDEM_QUEUE_DEADLINE_S["batch"],
        "max_queued_per_tenant": settings.TANDEM_MAX_QUEUED_PER_TENANT,
    }


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
@in_tenant
def routing(request: HttpRequest, membership: Membership) -> HttpResponse:
    """The tenant's routing policy in force, its versions, and (owners and admins) a form that publishes the next one."""
    if request.method == "POST" and "upstream" in request.POST:
        return _upstream_register(request, membership)
    if request.method == "POST" and "forget_cache" in request.POST:
        if not membership.can_manage:
            raise PermissionDenied("only owners and admins forget the tenant's cached answers")
        forgotten = async_to_sync(exact_cache.forget_tenant)(membership.tenant_id)
        messages.success(request, f"Forgot {forgotten} cached answer(s): the next identical requests are generated.")
        return redirect("frontend:routing")
    policy = inference_selectors.routing_policy_for(tenant_id=membership.tenant_id)
    initial = {name: getattr(policy, name, None) for name in POLICY_FIELDS}
    initial["allowed_tiers"] = sorted(t.value for t in policy.allowed)
    form = RoutingPolicyForm(request.POST or None, initial=initial) if membership.can_manage else None
    status = 200
    if request.method == "POST":
        if form is None:
            raise PermissionDenied("only owners and admins change the routing policy")
        if form.is_valid():
            try:
                published = inference_services.routing_policy_publish(
                    tenant=membership.tenant, created_by=request.user, **form.cleaned_data
                )
            except InvalidRequest as exc:
                form.add_error(exc.param if exc.param in form.fields else None, exc.message)
                status = 400
            else:
                messages.success(request, f"Published {published.label}: new requests route by it now.")
                return redirect("frontend:routing")
        else:
            status = 400
    context = {
        "policy": policy,
        "versions": inference_selectors.routing_policies_of(tenant_id=membership.tenant_id)[:20],
        "form": form,
        "health": tier_health(membership.tenant_id),
        "upstream_form": CloudUpstreamForm() if request.user.is_staff else None,
    }
    return _render(request, "frontend/routing.html", membership, context, status=status)


def _upstream_register(request: HttpRequest, membership: Membership) -> HttpResponse:
    """Operators (staff) register a cloud upstream from the console, as in the admin."""
    if not request.user.is_staff:
        raise PermissionDenied("only operators register cloud upstreams")
    form = CloudUpstreamForm(request.POST)
    if form.is_valid():
        try:
            upstream = inference_services.cloud_upstream_register(by=request.user, **form.cleaned_data)
        except InvalidRequest as exc:
            form.add_error(exc.param if exc.param in form.fields else None, exc.message)
        else:
            engines = get_engines()
            if engines.upstreams is not None:
                engines.upstreams.forget()  # this process routes to it from the next request
            messages.success(request, f"Registered the cloud upstream {upstream.name} for {upstream.model}.")
            return redirect("frontend:routing")
    policy = inference_selectors.routing_policy_for(tenant_id=membership.tenant_id)
    context = {
        "policy": policy,
        "versions": inference_selectors.routing_policies_of(tenant_id=membership.tenant_id)[:20],
        "form": None,
        "health": tier_health(membership.tenant_id),
        "upstream_form": form,
    }
    return _render(request, "frontend/routing.html", membership, context, status=400)


@require_GET
@login_required
@in_tenant
def usage(request: HttpRequest, membership: Membership) -> HttpResponse:
    context = {
        "rows": selectors.usage_for_tenant(tenant=membership.tenant, limit=USAGE_ROWS),
        "budgets": selectors.budget_status(tenant=membership.tenant),
        "spend": selectors.spend_by_tier(tenant=membership.tenant),
        "limit": USAGE_ROWS,
    }
    return _render(request, "frontend/usage.html", membership, context)
