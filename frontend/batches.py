"""The console's Batches page: the tenant's batch jobs with live progress, cost so far and their files.

Thin views over ``batches.selectors``, scoped to the current tenant (the header's switch):
a member sees only their tenant's batches and downloads only its files; another
tenant's file id is answered 404. The page polls ``progress.json`` every 2 s while a
batch is running (``frontend/static/frontend/batches.js``).
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from batches import selectors
from batches.errors import BatchObjectNotFound
from batches.models import TERMINAL, Batch
from frontend.views import _render, in_tenant
from tenants.models import Membership

PAGE_BATCHES = 50


def _rows(tenant_id: int) -> list[dict]:
    page, _ = selectors.batches_list(tenant_id=tenant_id, limit=PAGE_BATCHES)
    return [_row(batch) for batch in page]


def _row(batch: Batch) -> dict:
    done = batch.completed + batch.failed
    return {
        "id": batch.public_id,
        "status": batch.status,
        "running": batch.status not in TERMINAL,
        "endpoint": batch.endpoint,
        "created_at": batch.created_at.isoformat(),
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
        "done": done,
        "percent": round(100 * done / batch.total) if batch.total else 100,
        "cost": format(selectors.batch_cost(tenant_id=batch.tenant_id, batch_id=batch.public_id), "f"),
        "input_file_id": batch.input_file.public_id,
        "output_file_id": batch.output_file.public_id if batch.output_file else None,
        "error_file_id": batch.error_file.public_id if batch.error_file else None,
    }


@require_GET
@login_required
@in_tenant
def batches_page(request: HttpRequest, membership: Membership) -> HttpResponse:
    return _render(request, "frontend/batches.html", membership, {"rows": _rows(membership.tenant_id)})


@require_GET
@login_required
@in_tenant
def batches_progress(request: HttpRequest, membership: Membership) -> JsonResponse:
    return JsonResponse({"batches": _rows(membership.tenant_id)})


@require_GET
@login_required
@in_tenant
def batch_file(request: HttpRequest, membership: Membership, file_id: str) -> HttpResponse:
    try:
        found, content = selectors.file_content(tenant_id=membership.tenant_id, file_id=file_id)
    except BatchObjectNotFound:
        raise Http404("no such file") from None
    response = HttpResponse(content, content_type="application/jsonl")
    response["Content-Disposition"] = f'attachment; filename="{found.filename}"'
    return response
