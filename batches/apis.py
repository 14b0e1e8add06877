"""The batch endpoints of the OpenAI-compatible API: ``/v1/files`` and ``/v1/batches``, in OpenAI's shapes.

Thin adapters, as ``inference.openai_api``'s are (and through its decorator: the bearer
key, the request id, one error mapping): authenticate, validate, call one service or
selector on a DB thread, answer. Every object is looked up inside the key's tenant, so
another tenant's id is answered exactly as an unknown one (404).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import serializers

from batches import selectors, services
from batches.errors import InvalidBatchInput
from batches.models import Batch, BatchFile
from batches.tasks import batch_enqueue
from inference.errors import PermissionDenied
from inference.gateway import Principal
from inference.openai_api import StrictCharField, _principal, _validated, openai_endpoint
from inference.principals import COMPLETIONS_SCOPE
from inference.runtime import db
from inference.wire import parse_json

DEFAULT_LIST_LIMIT = 20


class BatchCreateInputSerializer(serializers.Serializer):
    input_file_id = StrictCharField(max_length=64)
    endpoint = StrictCharField(max_length=64)
    completion_window = StrictCharField(max_length=8)
    metadata = serializers.DictField(
        child=StrictCharField(allow_blank=True), required=False, default=None, allow_null=True
    )


def _epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def file_object(found: BatchFile) -> dict:
    return {
        "id": found.public_id,
        "object": "file",
        "bytes": found.bytes,
        "created_at": _epoch(found.created_at),
        # deleted then with its bytes (batches.services.retention_apply)
        "expires_at": _epoch(found.created_at + timedelta(days=settings.TANDEM_BATCH_RETENTION_DAYS)),
        "filename": found.filename,
        "purpose": found.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(batch: Batch) -> dict:
    return {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file.public_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file.public_id if batch.output_file else None,
        "error_file_id": batch.error_file.public_id if batch.error_file else None,
        "created_at": _epoch(batch.created_at),
        "in_progress_at": _epoch(batch.in_progress_at),
        "expires_at": _epoch(batch.expires_at),
        "finalizing_at": _epoch(batch.finalizing_at),
        "completed_at": _epoch(batch.completed_at),
        "failed_at": _epoch(batch.failed_at),
        "expired_at": _epoch(batch.expired_at),
        "cancelling_at": _epoch(batch.cancelling_at),
        "cancelled_at": _epoch(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata or None,
    }


def _may_spend(principal: Principal) -> None:
    """Uploading and running batches spends like completions do: the key needs that scope."""
    if not principal.may(COMPLETIONS_SCOPE):
        raise PermissionDenied(f"this API key lacks the {COMPLETIONS_SCOPE!r} scope")


# files --------------------------------------------------------------------------------------------
@openai_endpoint("GET", "POST")
async def files(request: HttpRequest, request_id: str) -> HttpResponse:
    if request.method == "POST":
        return await _file_create(request)
    principal = await _principal(request)
    purpose = request.GET.get("purpose") or None
    if purpose is not None and purpose not in BatchFile.Purpose.values:
        raise InvalidBatchInput(f"purpose must be one of {', '.join(BatchFile.Purpose.values)}", param="purpose")
    page, more = await db(selectors.files_list)(
        tenant_id=principal.tenant_id,
        purpose=purpose,
        after=request.GET.get("after") or None,
        limit=_limit(request.GET.get("limit")),
    )
    return JsonResponse(_page([file_object(f) for f in page], more))


def _page(data: list[dict], more: bool) -> dict:
    """OpenAI's list object."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


async def _file_create(request: HttpRequest) -> HttpResponse:
    principal = await _principal(request)
    _may_spend(principal)
    form, uploads = await asyncio.to_thread(lambda: (request.POST, request.FILES))
    upload = uploads.get("file")
    if upload is None:
        raise InvalidBatchInput("send the file as multipart form data, in the field 'file'", param="file")
    purpose = form.get("purpose", "")
    content = await asyncio.to_thread(upload.read)
    created = await db(services.file_upload)(
        tenant_id=principal.tenant_id, filename=upload.name or "", content=content, purpose=purpose
    )
    return JsonResponse(file_object(created))


@openai_endpoint("GET", "DELETE")
async def file_detail(request: HttpRequest, request_id: str, file_id: str) -> HttpResponse:
    principal = await _principal(request)
    if request.method == "DELETE":
        _may_spend(principal)  # the keys that may upload may delete
        deleted = await db(services.file_delete)(tenant_id=principal.tenant_id, file_id=file_id)
        return JsonResponse({"id": deleted.public_id, "object": "file", "deleted": True})
    return JsonResponse(file_object(await db(selectors.file_get)(tenant_id=principal.tenant_id, file_id=file_id)))


@openai_endpoint("GET")
async def file_content(request: HttpRequest, request_id: str, file_id: str) -> HttpResponse:
    principal = await _principal(request)
    found, content = await db(selectors.file_content)(tenant_id=principal.tenant_id, file_id=file_id)
    response = HttpResponse(content, content_type="application/jsonl")
    response["Content-Disposition"] = f'attachment; filename="{found.filename}"'
    return response


# batches ------------------------------------------------------------------------------------------
@openai_endpoint("GET", "POST")
async def batches(request: HttpRequest, request_id: str) -> HttpResponse:
    principal = await _principal(request)
    if request.method == "POST":
        return await _batch_create(request, principal)
    limit = _limit(request.GET.get("limit"))
    page, more = await db(selectors.batches_list)(
        tenant_id=principal.tenant_id, after=request.GET.get("after") or None, limit=limit
    )
    return JsonResponse(_page([batch_object(b) for b in page], more))


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= selectors.MAX_LIST_LIMIT:
        raise InvalidBatchInput(f"limit must be an integer from 1 to {selectors.MAX_LIST_LIMIT}", param="limit")
    return int(raw)


async def _batch_create(request: HttpRequest, principal: Principal) -> HttpResponse:
    _may_spend(principal)
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise InvalidBatchInput("the request body must be a JSON object", code="invalid_json")
    data = _validated(BatchCreateInputSerializer, body)
    batch = await db(services.batch_create)(
        tenant_id=principal.tenant_id,
        api_key_id=principal.api_key_id,
        input_file_id=data["input_file_id"],
        endpoint=data["endpoint"],
        completion_window=data["completion_window"],
        metadata=data["metadata"],
    )
    answer = batch_object(batch)  # as created: its run is queued (committed first, so the worker finds it)
    await asyncio.to_thread(batch_enqueue, batch.pk)
    return JsonResponse(answer)


@openai_endpoint("GET")
async def batch_detail(request: HttpRequest, request_id: str, batch_id: str) -> HttpResponse:
    principal = await _principal(request)
    return JsonResponse(batch_object(await db(selectors.batch_get)(tenant_id=principal.tenant_id, batch_id=batch_id)))


@openai_endpoint("POST")
async def batch_cancel(request: HttpRequest, request_id: str, batch_id: str) -> HttpResponse:
    principal = await _principal(request)
    _may_spend(principal)
    await db(services.batch_cancel)(tenant_id=principal.tenant_id, batch_id=batch_id)
    return JsonResponse(batch_object(await db(selectors.batch_get)(tenant_id=principal.tenant_id, batch_id=batch_id)))
