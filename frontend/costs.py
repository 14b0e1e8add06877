"""The console's cost dashboard and its CSV export: thin views over ``dashboards.selectors``.

Scope: a member sees the current tenant (the header's tenant switch), whatever the query
says; an operator (Django staff) may pick any tenant, or all of them (``?tenant=all``),
and needs no membership for it.
"""

from __future__ import annotations

import csv
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from dashboards import selectors as dashboards
from dashboards.params import DEFAULT_PRESET, PRESETS, InvalidParams, ReportParams, report_params
from dashboards.selectors import ALL_TENANTS, STACK_LABELS, TenantScope
from frontend.views import _no_tenant, _render, current_membership
from tenants.models import Membership, Tenant

SPLIT_LABELS = {"none": "tier", "model": "model version", "api_key": "API key", "user": "user", "tag": "tag"}


def _scope(request: HttpRequest) -> tuple[Membership | None, TenantScope | None]:
    """(the user's current membership, the tenant to show); a scope of None: nothing this user may see."""
    membership = current_membership(request)
    if request.user.is_staff:
        asked = request.GET.get("tenant", "").strip()
        if asked == ALL_TENANTS:
            return membership, ALL_TENANTS
        if asked.isdigit() and Tenant.objects.filter(pk=int(asked)).exists():
            return membership, int(asked)
        return membership, membership.tenant_id if membership is not None else ALL_TENANTS
    return membership, membership.tenant_id if membership is not None else None


def _params(request: HttpRequest) -> tuple[ReportParams, str | None]:
    """The query's parameters, or the default range and what was wrong with the query."""
    now = timezone.now()
    try:
        return report_params(request.GET, now), None
    except InvalidParams as exc:
        return report_params({}, now), f"{exc.param}: {exc.message}"


def _split_param(p: ReportParams) -> str:
    return p.split + (f":{p.tag_key}" if p.tag_key else "")


@require_GET
@login_required
def costs(request: HttpRequest) -> HttpResponse:
    membership, scope = _scope(request)
    if scope is None:
        return _no_tenant(request)
    p, error = _params(request)
    report = dashboards.cost_report(
        tenant=scope, start=p.start, end=p.end, granularity=p.granularity, split=p.split, tag_key=p.tag_key
    )
    budgets = dashboards.budget_burn_down(tenant=scope)
    scope_name = "all tenants" if scope == ALL_TENANTS else Tenant.objects.get(pk=scope).name
    query = request.GET.copy()
    context: dict[str, Any] = {
        "report": report,
        "params": p,
        "error": error,
        "split_param": _split_param(p),
        "scope": scope,
        "scope_name": scope_name,
        "is_operator": request.user.is_staff,
        "all_tenants": Tenant.objects.order_by("name").values("pk", "name") if request.user.is_staff else [],
        "presets": [*PRESETS, "custom"],
        "default_preset": DEFAULT_PRESET,
        "split_labels": SPLIT_LABELS,
        "split_label": SPLIT_LABELS[p.split],
        "budgets": budgets,
        "csv_url": f"{reverse('frontend:costs-csv')}?{query.urlencode()}",
        "chart_data": {
            **report.chart,
            "budgets": [
                {
                    "id": b["id"],
                    "label": f"{b['tenant']}: {b['scope']} {b['period']}",
                    "daily": [{"bucket": d["bucket"], "spent": str(d["spent"])} for d in b.get("daily", [])],
                    "hard_limit": None if b["hard_limit"] is None else str(b["hard_limit"]),
                    "projected": str(b["projected"]),
                }
                for b in budgets
            ],
        },
        "stack_labels": STACK_LABELS,
    }
    return _render(request, "frontend/costs.html", membership, context)


CSV_COLUMNS = (
    "bucket",
    "split",
    "split_value",
    "split_label",
    "route_tier",
    "source",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "drafted_tokens",
    "accepted_tokens",
    "gpu_ms",
    "cost_edge",
    "cost_verifier",
    "cost_cloud",
    "cost_total",
    "saving",
)


@require_GET
@login_required
def costs_csv(request: HttpRequest) -> HttpResponse:
    """The dashboard's numbers, one line per bucket, split value, tier and source; amounts exact (``f`` format)."""
    _, scope = _scope(request)
    if scope is None:
        return _no_tenant(request)
    try:
        p = report_params(request.GET, timezone.now())
    except InvalidParams as exc:
        return HttpResponse(f"{exc.param}: {exc.message}\n", status=400, content_type="text/plain")
    report = dashboards.cost_report(
        tenant=scope, start=p.start, end=p.end, granularity=p.granularity, split=p.split, tag_key=p.tag_key
    )
    name = f"costs-{scope}-{p.start:%Y%m%dT%H%M}-{p.end:%Y%m%dT%H%M}.csv"
    response = HttpResponse(content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    split = _split_param(p)
    for row in report.rows:
        writer.writerow(
            [
                row["bucket"].isoformat(),
                split,
                row["value"],
                row["label"],
                row["route_tier"],
                row["source"],
                *(format(row[c], "f") if not isinstance(row[c], int) else row[c] for c in CSV_COLUMNS[6:]),
            ]
        )
    return response
