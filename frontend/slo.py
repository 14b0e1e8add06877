"""The console's SLO page: objectives with attainment, error budget and burn rates, charts, alerts; and its forms.

Thin: figures come from ``slo.selectors``, edits go through ``slo.services``. Members see
their current tenant's page; owners and admins edit its objectives and webhook; operators
(Django staff) may open any tenant's page (``?tenant=<id>``), read-only.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from dashboards.selectors import acceptance_by_hour
from frontend.views import _no_tenant, _render, current_membership
from slo import errors as slo_errors
from slo import selectors, services
from slo.counts import EDGES
from slo.models import AlertWebhook
from slo.objectives import LatencyClass, ObjectiveKind
from tenants.models import Membership, Tenant

CHART_DAYS = (1, 7, 28)


class ObjectiveForm(forms.Form):
    latency_class = forms.ChoiceField(choices=LatencyClass.choices, label="Latency class")
    kind = forms.ChoiceField(choices=ObjectiveKind.choices, label="Objective")
    threshold_ms = forms.IntegerField(
        required=False,
        min_value=0,
        label="Threshold (ms)",
        help_text="Latency objectives only; one of the histogram edges: "
        + "; ".join(f"{k}: {', '.join(str(e) for e in EDGES[k])}" for k in ("ttft", "itl", "e2e")),
    )
    target = forms.FloatField(min_value=0, max_value=1, label="Target", help_text="A share, e.g. 0.99")
    window_days = forms.IntegerField(min_value=1, max_value=90, initial=28, label="Window (days)")


class WebhookForm(forms.Form):
    url = forms.URLField(
        required=False,
        assume_scheme="https",
        max_length=500,
        label="Webhook URL",
        help_text="Each alert's firing and resolution is POSTed here as JSON; empty: the platform's webhook, if any.",
    )


def _tenant_of(request: HttpRequest) -> tuple[Tenant, Membership | None, bool] | None:
    """(the tenant shown, the user's current membership, whether they may edit it); None: no tenant at all."""
    membership = current_membership(request)
    wanted = request.GET.get("tenant")
    if wanted and request.user.is_staff:
        try:
            tenant = Tenant.objects.get(pk=int(wanted))
        except (ValueError, Tenant.DoesNotExist):
            raise Http404("no such tenant") from None
        mine = membership is not None and membership.tenant_id == tenant.pk
        return tenant, membership, mine and membership is not None and membership.can_manage
    if membership is None:
        first = Tenant.objects.order_by("name").first() if request.user.is_staff else None
        return None if first is None else (first, None, False)  # an operator in no tenant: the first one
    return membership.tenant, membership, membership.can_manage


@require_GET
@login_required
@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    found = _tenant_of(request)
    if found is None:
        return _no_tenant(request)
    tenant, membership, can_manage = found
    latency_class = request.GET.get("class", LatencyClass.INTERACTIVE)
    if latency_class not in LatencyClass.values:
        latency_class = LatencyClass.INTERACTIVE
    try:
        chart_days = int(request.GET.get("days", "7"))
    except ValueError:
        chart_days = 7
    chart_days = chart_days if chart_days in CHART_DAYS else 7
    now = timezone.now()
    data = selectors.dashboard(tenant_id=tenant.pk, now=now, latency_class=latency_class, chart_days=chart_days)
    # the speculative acceptance rate, hour by hour over the same hours, from the ledger's rollups (every class)
    hours = selectors.chart_hours(now=now, days=chart_days)
    rates = acceptance_by_hour(tenant=tenant.pk, start=hours[0], end=now)
    series = {**data["series"], "acceptance": [rates.get(hour) for hour in hours]}
    webhook = AlertWebhook.objects.filter(tenant=tenant).first()
    context = {
        "shown_tenant": tenant,
        "now": now,
        "cards": data["objectives"],
        "series": series,
        "latency_class": latency_class,
        "classes": LatencyClass.values,
        "chart_days": chart_days,
        "chart_day_choices": CHART_DAYS,
        "alerts": selectors.alerts_for_tenant(tenant_id=tenant.pk),
        "can_manage": can_manage,
        "objective_form": ObjectiveForm(initial={"latency_class": latency_class}) if can_manage else None,
        "webhook_form": WebhookForm(initial={"url": webhook.url if webhook else ""}) if can_manage else None,
        "tenants": Tenant.objects.order_by("name") if request.user.is_staff else None,
    }
    return _render(request, "frontend/slo.html", membership, context)


def _managed_tenant(request: HttpRequest) -> Tenant:
    membership = current_membership(request)
    if membership is None or not membership.can_manage:
        raise PermissionDenied("only owners and admins can change SLOs and alerts")
    return membership.tenant


@require_POST
@login_required
def objective_save(request: HttpRequest) -> HttpResponse:
    tenant = _managed_tenant(request)
    form = ObjectiveForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Objective not saved: " + "; ".join(e for errs in form.errors.values() for e in errs))
        return redirect("frontend:slo")
    data = form.cleaned_data
    try:
        services.objective_set(tenant=tenant, by=request.user, **data)
    except slo_errors.InvalidInput as exc:
        messages.error(request, f"Objective not saved: {exc.message}")
    else:
        messages.success(request, "Objective saved.")
    return redirect(f"{reverse('frontend:slo')}?class={data['latency_class']}")


@require_POST
@login_required
def objective_reset(request: HttpRequest) -> HttpResponse:
    tenant = _managed_tenant(request)
    latency_class, kind = request.POST.get("latency_class", ""), request.POST.get("kind", "")
    services.objective_reset(tenant=tenant, latency_class=latency_class, kind=kind)
    messages.success(request, "Objective back to the platform default.")
    return redirect(f"{reverse('frontend:slo')}?class={latency_class}")


@require_POST
@login_required
def webhook_save(request: HttpRequest) -> HttpResponse:
    tenant = _managed_tenant(request)
    form = WebhookForm(request.POST)
    try:
        if not form.is_valid():
            raise slo_errors.InvalidInput("the webhook must be an http(s) URL")
        services.alert_webhook_set(tenant=tenant, url=form.cleaned_data["url"])
    except slo_errors.InvalidInput as exc:
        messages.error(request, f"Webhook not saved: {exc.message}")
    else:
        messages.success(request, "Webhook saved.")
    return redirect("frontend:slo")
