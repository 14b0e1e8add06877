"""Reads of the batch app: a tenant's files and batches (always scoped by tenant), their cost and progress."""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum

from batches import storage
from batches.errors import BatchObjectNotFound
from batches.models import Batch, BatchFile
from tenants.models import UsageRecord

MAX_LIST_LIMIT = 100


def file_get(*, tenant_id: int, file_id: str) -> BatchFile:
    found = BatchFile.objects.filter(tenant_id=tenant_id, public_id=file_id, deleted_at__isnull=True).first()
    if found is None:
        raise BatchObjectNotFound(f"no file {file_id!r}", param="file_id")
    return found


def file_content(*, tenant_id: int, file_id: str) -> tuple[BatchFile, bytes]:
    found = file_get(tenant_id=tenant_id, file_id=file_id)
    return found, storage.read(found.storage_name)


def files_list(*, tenant_id: int, purpose: str | None = None, after: str | None = None, limit: int = 20):
    """The tenant's files (not deleted), newest first, after the file ``after``; and whether more follow."""
    files = BatchFile.objects.filter(tenant_id=tenant_id, deleted_at__isnull=True)
    if purpose:
        files = files.filter(purpose=purpose)
    return _page(files, tenant_id=tenant_id, after=after, limit=limit, kind="file")


def batch_get(*, tenant_id: int, batch_id: str) -> Batch:
    found = Batch.objects.select_related("input_file", "output_file", "error_file").filter(
        tenant_id=tenant_id, public_id=batch_id
    )
    batch = found.first()
    if batch is None:
        raise BatchObjectNotFound(f"no batch {batch_id!r}", param="batch_id")
    return batch


def batches_list(*, tenant_id: int, after: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
    """The tenant's batches, newest first, after the batch ``after`` (OpenAI's cursor); and whether more follow."""
    batches = Batch.objects.select_related("input_file", "output_file", "error_file").filter(tenant_id=tenant_id)
    return _page(batches, tenant_id=tenant_id, after=after, limit=limit, kind="batch")


def _page(objects, *, tenant_id: int, after: str | None, limit: int, kind: str):
    """``objects`` newest first after the tenant's object ``after`` (OpenAI's cursor), ``limit`` of them; and whether
    more follow. An ``after`` that names none of the tenant's objects of that kind is a 404 naming ``after``."""
    if after:
        model = objects.model
        cursor = model.objects.filter(tenant_id=tenant_id, public_id=after).values_list("pk", flat=True).first()
        if cursor is None:
            raise BatchObjectNotFound(f"no {kind} {after!r}", param="after")
        objects = objects.filter(pk__lt=cursor)
    page = list(objects.order_by("-pk")[: limit + 1])
    return page[:limit], len(page) > limit


def batch_cost(*, tenant_id: int, batch_id: str) -> Decimal:
    """What the batch's lines were charged so far: the ledger rows tagged with the batch."""
    total = UsageRecord.objects.filter(tenant_id=tenant_id, tags__batch_id=batch_id).aggregate(t=Sum("cost_total"))["t"]
    return total if total is not None else Decimal(0)
