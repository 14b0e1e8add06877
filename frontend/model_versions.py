"""The console's Models page: every model version, the rollouts with each step live, and tenants' pins.

Everyone in a tenant sees the versions and the tenant's pins; owners pin. Operators
(staff) also start rollouts and promote, pause, resume or roll them back. Thin views over
``registry.services`` (which check who may pin and write the audit events) and
``registry.selectors``. The rollouts' section reloads itself while one is active
(``?part=rollouts`` renders just that section; ``frontend/models.js`` polls it).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from frontend.views import _render, in_tenant
from registry import errors, selectors, services
from registry.models import ModelVersion, Rollout, RolloutStatus
from tenants import errors as tenant_errors
from tenants.models import Membership, MembershipRole

ROLLOUT_ACTIONS = {
    "promote": services.rollout_promote,
    "rollback": services.rollout_rollback,
    "pause": services.rollout_pause,
    "resume": services.rollout_resume,
}


def _rollouts_context() -> dict:
    rollouts = selectors.rollouts_list()
    active = any(r.status in selectors.ACTIVE_ROLLOUT for r in rollouts)
    return {"rollouts": rollouts, "rollouts_active": active}


@never_cache
@require_GET
@login_required
@in_tenant
def models_page(request: HttpRequest, membership: Membership) -> HttpResponse:
    operator = request.user.is_staff
    if request.GET.get("part") == "rollouts":
        if not operator:
            raise PermissionDenied("only operators see rollouts")
        return render(request, "frontend/_rollouts.html", {**_rollouts_context(), "operator": True})
    context = {
        "versions": selectors.versions_list(),
        "pins": selectors.pins_for_tenant(tenant_id=membership.tenant_id),
        "is_owner": membership.role == MembershipRole.OWNER,
        "operator": operator,
        "quantisations": services.QUANTISATIONS,
        **(_rollouts_context() if operator else {}),
    }
    return _render(request, "frontend/models.html", membership, context)


@require_POST
@login_required
@in_tenant
def model_pin(request: HttpRequest, membership: Membership) -> HttpResponse:
    """Pin the tenant's sessions of a model to a draft version (``version`` empty: unpin). Owners only."""
    model = request.POST.get("model", "")
    version = None
    if request.POST.get("version"):
        try:
            version = ModelVersion.objects.get(pk=int(request.POST["version"]), model=model)
        except (ValueError, ModelVersion.DoesNotExist):
            raise Http404("no such version of that model") from None
    try:
        services.model_pin_set(tenant=membership.tenant, model=model, version=version, by=request.user)
    except tenant_errors.PermissionDenied as exc:
        raise PermissionDenied(exc.message) from None
    except errors.RegistryError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{model}: pinned to {version.version}" if version else f"{model}: unpinned")
    return redirect("frontend:models")


@require_POST
@login_required
def rollout_create(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied("only operators start rollouts")
    try:
        share = Decimal(request.POST.get("canary_share", "0.1"))
        samples = int(request.POST.get("canary_min_samples", "20"))
        rollout = services.rollout_start(
            model=request.POST.get("model", ""),
            source=request.POST.get("source", "").strip(),
            by=request.user,
            quantisation=request.POST.get("quantisation", ""),
            canary_share=share,
            canary_min_samples=samples,
            training_data=request.POST.get("training_data", ""),
        )
    except (InvalidOperation, ValueError):
        messages.error(request, "the canary's share and sample count must be numbers")
    except errors.RegistryError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"rollout {rollout.pk} started")
    return redirect("frontend:models")


@require_POST
@login_required
def rollout_action(request: HttpRequest) -> HttpResponse:
    """Promote, pause, resume or roll back a rollout (POST ``rollout`` and ``action``): operators only."""
    if not request.user.is_staff:
        raise PermissionDenied("only operators promote, pause or roll back")
    action = request.POST.get("action", "")
    if action not in ROLLOUT_ACTIONS:
        raise Http404("no such action")
    try:
        pk = int(request.POST.get("rollout", ""))
        rollout = Rollout.objects.get(pk=pk)
    except (ValueError, Rollout.DoesNotExist):
        raise Http404("no such rollout") from None
    try:
        ROLLOUT_ACTIONS[action](rollout=rollout, by=request.user)
    except errors.RegistryError as exc:
        messages.error(request, exc.message)
    else:
        done = RolloutStatus(Rollout.objects.get(pk=pk).status).label.lower()
        messages.success(request, f"rollout {pk}: {done}")
    return redirect("frontend:models")
