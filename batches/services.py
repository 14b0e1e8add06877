"""Writes of the batch app: upload a file, create and cancel a batch, claim and record lines, finalize.

Every function here is synchronous ORM work (the runner calls them through
``inference.runtime.db``). Money never moves here: lines are charged by the gateway, and
``line_recover`` only decides whether an interrupted line may run again (never when the
ledger already holds its charge).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.text import get_valid_filename

from batches import lines, storage
from batches.errors import BatchObjectNotFound, BatchStateConflict, InvalidBatchInput
from batches.models import TERMINAL, Batch, BatchFile, BatchLine, BatchStatus, FilePurpose, LineStatus
from tenants import errors as tenant_errors
from tenants import services as tenant_services
from tenants.models import Reservation, UsageRecord

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
MAX_METADATA_PAIRS = 16  # OpenAI's limits on a batch's metadata
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
RUNNABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


# files -------------------------------------------------------------------------------------------
def file_upload(*, tenant_id: int, filename: str, content: bytes, purpose: str) -> BatchFile:
    """Store a batch input file after checking it is UTF-8 JSONL within the limits; refuse it whole otherwise.

    A line that is not a request (bad JSON, a missing field) is not a reason to refuse the
    file: it fails alone, in the batch's error file. A file where no line is a JSON object,
    or where two lines share a ``custom_id`` (the output could not be matched to them), is refused.
    """
    if purpose != FilePurpose.BATCH:
        raise InvalidBatchInput(f"purpose must be 'batch', got {purpose!r}", param="purpose")
    if not content:
        raise InvalidBatchInput("the file is empty", param="file")
    if len(content) > settings.TANDEM_BATCH_MAX_FILE_BYTES:
        raise InvalidBatchInput(
            f"the file has {len(content)} bytes; at most {settings.TANDEM_BATCH_MAX_FILE_BYTES} are accepted",
            param="file",
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBatchInput(f"the file is not UTF-8 text (byte {exc.start})", param="file") from None
    rows = [row for row in text.splitlines() if row.strip()]
    if len(rows) > settings.TANDEM_BATCH_MAX_LINES:
        raise InvalidBatchInput(
            f"the file has {len(rows)} lines; at most {settings.TANDEM_BATCH_MAX_LINES} are accepted", param="file"
        )
    seen: dict[str, int] = {}
    objects = 0
    for number, row in enumerate(rows, start=1):
        parsed = _parse(row)
        if not isinstance(parsed, dict):
            continue
        objects += 1
        custom_id = parsed.get("custom_id")
        if isinstance(custom_id, str):
            if custom_id in seen:
                raise InvalidBatchInput(
                    f"custom_id {custom_id[:100]!r} is on lines {seen[custom_id]} and {number}; each must be unique",
                    param="file",
                )
            seen[custom_id] = number
    if not objects:
        raise InvalidBatchInput(
            "no line of the file is a JSON object (expected JSONL: one request per line)", param="file"
        )
    name = _safe_filename(filename)
    stored = storage.store(name=f"batch-files/{tenant_id}/{name}", content=content)
    return BatchFile.objects.create(
        tenant_id=tenant_id, purpose=purpose, filename=name, bytes=len(content), lines=len(rows), storage_name=stored
    )


def _safe_filename(filename: str) -> str:
    """The client's file name as a plain name (no directories, quotes or odd characters): it is a storage path part."""
    try:
        return get_valid_filename(os.path.basename(filename or ""))[:200]
    except SuspiciousFileOperation:  # nothing usable left of it
        return "batch.jsonl"


def _parse(row: str) -> Any:
    try:
        return json.loads(row)
    except ValueError:
        return None


def file_delete(*, tenant_id: int, file_id: str) -> BatchFile:
    """Delete a file of the tenant's: its bytes go from storage; it is gone for the API (404 from now on).

    The input of a batch still running is refused (the runner may still read it): cancel the batch first.
    """
    with transaction.atomic():
        found = (
            BatchFile.objects.select_for_update()
            .filter(tenant_id=tenant_id, public_id=file_id, deleted_at__isnull=True)
            .first()
        )
        if found is None:
            raise BatchObjectNotFound(f"no file {file_id!r}", param="file_id")
        running = (
            Batch.objects.filter(input_file=found).exclude(status__in=TERMINAL).values_list("public_id", flat=True)
        )
        if running:
            raise BatchStateConflict(
                f"file {file_id!r} is the input of batch {running[0]!r}, which has not ended; cancel it first",
                param="file_id",
            )
        _erase(found, timezone.now())
    return found


def _erase(found: BatchFile, now: datetime) -> None:
    storage.batch_storage().delete(found.storage_name)
    found.deleted_at = now
    found.save(update_fields=["deleted_at"])


def retention_apply(*, now: datetime | None = None) -> dict[str, int]:
    """Forget what batches keep past ``TANDEM_BATCH_RETENTION_DAYS``: files (their bytes), and ended batches' lines.

    A file that is the input of a batch still running is kept until the batch ends. An ended
    batch keeps its row and counts (its files are deleted on their own clock); its lines,
    which hold each request and answer, are deleted. Returns how many of each went.
    """
    now = now or timezone.now()
    before = now - timedelta(days=settings.TANDEM_BATCH_RETENTION_DAYS)
    in_use = Batch.objects.exclude(status__in=TERMINAL).values("input_file_id")
    files = 0
    for found in BatchFile.objects.filter(deleted_at__isnull=True, created_at__lt=before).exclude(pk__in=in_use):
        _erase(found, now)
        files += 1
    ended = Batch.objects.filter(status__in=TERMINAL, created_at__lt=before)
    lines_deleted, _ = BatchLine.objects.filter(batch__in=ended).delete()
    return {"files": files, "lines": lines_deleted}


# batches -----------------------------------------------------------------------------------------
def batch_create(
    *,
    tenant_id: int,
    api_key_id: int | None,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Mapping[str, str] | None,
) -> Batch:
    """A batch of the input file's lines, each a pending line (or failed at once, when it is not a request)."""
    if endpoint not in lines.ENDPOINTS:
        raise InvalidBatchInput(f"endpoint must be one of {', '.join(lines.ENDPOINTS)}", param="endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidBatchInput(
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}", param="completion_window"
        )
    metadata = _metadata(metadata)
    source = BatchFile.objects.filter(tenant_id=tenant_id, public_id=input_file_id, deleted_at__isnull=True).first()
    if source is None:
        raise BatchObjectNotFound(f"no file {input_file_id!r}", param="input_file_id")
    if source.purpose != FilePurpose.BATCH:
        raise InvalidBatchInput(f"file {input_file_id!r} is not a batch input file", param="input_file_id")
    rows = [row for row in storage.read(source.storage_name).decode("utf-8").splitlines() if row.strip()]
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.create(
            tenant_id=tenant_id,
            api_key_id=api_key_id,
            endpoint=endpoint,
            completion_window=completion_window,
            input_file=source,
            metadata=metadata,
            total=len(rows),
            expires_at=now + COMPLETION_WINDOWS[completion_window],
        )
        made = [_line(batch, number, row, endpoint, now) for number, row in enumerate(rows)]
        BatchLine.objects.bulk_create(made, batch_size=1000)
        failed = sum(1 for line in made if line.status == LineStatus.FAILED)
        if failed:
            Batch.objects.filter(pk=batch.pk).update(failed=failed)
            batch.failed = failed
    return batch


def _line(batch: Batch, number: int, row: str, endpoint: str, now: datetime) -> BatchLine:
    parsed = _parse(row)
    custom_id = parsed.get("custom_id") if isinstance(parsed, dict) else None
    line = BatchLine(
        batch=batch, number=number, custom_id=custom_id if isinstance(custom_id, str) else "", request=parsed
    )
    if parsed is None and row.strip() != "null":
        line.error = {"code": "invalid_json", "message": f"line {number + 1} is not valid JSON"}
    else:
        line.error = lines.shape_error(parsed, endpoint)
    if line.error is not None:
        line.status, line.finished_at = LineStatus.FAILED, now
    return line


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if (
        not isinstance(metadata, Mapping)
        or len(metadata) > MAX_METADATA_PAIRS
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY and len(v) <= MAX_METADATA_VALUE
            for k, v in metadata.items()
        )
    ):
        raise InvalidBatchInput(
            f"metadata must be at most {MAX_METADATA_PAIRS} string pairs "
            f"(keys <= {MAX_METADATA_KEY}, values <= {MAX_METADATA_VALUE} characters)",
            param="metadata",
        )
    return dict(metadata)


def batch_cancel(*, tenant_id: int, batch_id: str) -> Batch:
    """Stop starting the batch's lines (those running finish, and are charged); finalize now when no worker runs it."""
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(tenant_id=tenant_id, public_id=batch_id).first()
        if batch is None:
            raise BatchObjectNotFound(f"no batch {batch_id!r}", param="batch_id")
        if batch.status in TERMINAL or batch.status == BatchStatus.FINALIZING:
            raise BatchStateConflict(f"batch {batch_id!r} is {batch.status}: it can no longer be cancelled")
        if batch.status != BatchStatus.CANCELLING:
            batch.status, batch.cancelling_at = BatchStatus.CANCELLING, timezone.now()
            batch.save(update_fields=["status", "cancelling_at"])
        running = not _runner_stale(batch, timezone.now())
    if not running:  # no worker holds it (queued, or its worker died): nothing else would finish it
        batch_finalize(batch_pk=batch.pk)
        batch.refresh_from_db()
    return batch


def _runner_stale(batch: Batch, now: datetime) -> bool:
    return not batch.runner or batch.heartbeat_at is None or batch.heartbeat_at < now - _stale_after()


def _stale_after() -> timedelta:
    return timedelta(seconds=settings.TANDEM_BATCH_STALE_S)


# running: what the runner (batches.runner) calls -------------------------------------------------
def batch_claim(*, batch_pk: int, runner: str) -> Batch | None:
    """Take the batch for ``runner`` unless another live runner holds it or it has ended; recover its orphans.

    A second delivery of the same task (Celery's ``acks_late`` redelivers a task whose
    worker died) finds the batch held by a fresh heartbeat and leaves it alone; a batch
    whose runner died (its heartbeat is stale) is taken over, and its lines that were
    running are recovered (``line_recover``) before anything else starts.
    """
    now = timezone.now()
    free = Q(runner="") | Q(runner=runner) | Q(heartbeat_at__lt=now - _stale_after()) | Q(heartbeat_at=None)
    with transaction.atomic():
        taken = Batch.objects.filter(free, pk=batch_pk, status__in=RUNNABLE).update(runner=runner, heartbeat_at=now)
        if not taken:
            return None
        Batch.objects.filter(pk=batch_pk, status=BatchStatus.VALIDATING).update(
            status=BatchStatus.IN_PROGRESS, in_progress_at=now
        )
        batch = Batch.objects.get(pk=batch_pk)
        for line in BatchLine.objects.filter(batch=batch, status=LineStatus.RUNNING):
            line_recover(line=line)
    return batch


def batch_heartbeat(*, batch_pk: int, runner: str) -> bool:
    """Still ours (and its heartbeat renewed)? False once another runner took it over."""
    return bool(Batch.objects.filter(pk=batch_pk, runner=runner).update(heartbeat_at=timezone.now()))


def batch_stopping(*, batch_pk: int) -> bool:
    """Whether the batch starts no more lines: cancelled, ended, or past its completion window."""
    batch = Batch.objects.only("status", "expires_at").get(pk=batch_pk)
    return batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) or batch.expires_at <= timezone.now()


def lines_pending(*, batch_pk: int) -> list[int]:
    return list(
        BatchLine.objects.filter(batch_id=batch_pk, status=LineStatus.PENDING)
        .order_by("number")
        .values_list("pk", flat=True)
    )


def line_claim(*, line_pk: int, batch: Batch) -> BatchLine | None:
    """Mark a pending line of ``batch`` running under its next request id; None when another run took it first."""
    line = BatchLine.objects.get(pk=line_pk, batch=batch)
    line.batch = batch
    attempt = line.attempts + 1
    request_id = BatchLine.request_id_for(batch.public_id, line.number, attempt)
    claimed = BatchLine.objects.filter(pk=line_pk, status=LineStatus.PENDING, attempts=line.attempts).update(
        status=LineStatus.RUNNING, attempts=attempt, request_id=request_id
    )
    if not claimed:
        return None
    line.status, line.attempts, line.request_id = LineStatus.RUNNING, attempt, request_id
    return line


def line_retry_id(*, line_pk: int) -> str:
    """A new request id for a running line the gateway refused before charging it (a retry may not reuse one)."""
    line = BatchLine.objects.select_related("batch").get(pk=line_pk)
    attempt = line.attempts + 1
    request_id = BatchLine.request_id_for(line.batch.public_id, line.number, attempt)
    BatchLine.objects.filter(pk=line_pk, status=LineStatus.RUNNING).update(attempts=attempt, request_id=request_id)
    return request_id


def line_record(
    *, line_pk: int, ok: bool, status_code: int | None, body: dict | None, error: dict | None = None
) -> bool:
    """A running line's answer, and its batch's count, in one commit; False when it was not running (nothing changes)."""
    with transaction.atomic():
        done = BatchLine.objects.filter(pk=line_pk, status=LineStatus.RUNNING).update(
            status=LineStatus.COMPLETED if ok else LineStatus.FAILED,
            status_code=status_code,
            body=body,
            error=error,
            finished_at=timezone.now(),
        )
        if done:
            batch_id = BatchLine.objects.filter(pk=line_pk).values_list("batch_id", flat=True).get()
            counter = "completed" if ok else "failed"
            Batch.objects.filter(pk=batch_id).update(**{counter: F(counter) + 1})
    return bool(done)


def line_recover(*, line: BatchLine) -> None:
    """A line left running by a runner that died: run it again only if the ledger holds no charge for it.

    Money: the ledger's request id is unique and the line's id names it, so the ledger
    answers exactly whether the line was charged. Charged, its answer was lost in the
    moment between the charge and its record (the runner died there): it fails with a
    clear error and is never run again, never charged twice. Not charged: a reservation
    still held for it is released (nothing was delivered to anyone) and it goes back to
    pending, to run under a new request id.
    """
    batch = line.batch
    charged = UsageRecord.objects.filter(tenant_id=batch.tenant_id, request_id=line.request_id).exists()
    if charged:
        message = "the worker stopped after this request was charged and before its answer was saved; not run again"
        line_record(
            line_pk=line.pk, ok=False, status_code=None, body=None, error={"code": "output_lost", "message": message}
        )
        return
    held = Reservation.objects.filter(
        tenant_id=batch.tenant_id, request_id=line.request_id, status=Reservation.Status.HELD
    ).first()
    if held is not None:
        try:
            tenant_services.reservation_release(reservation=held)
        except tenant_errors.AlreadySettled:  # settled meanwhile after all: then it is charged
            line_recover(line=line)
            return
    BatchLine.objects.filter(pk=line.pk, status=LineStatus.RUNNING).update(status=LineStatus.PENDING)


# finishing ----------------------------------------------------------------------------------------
STOPPED_ERRORS = {
    BatchStatus.CANCELLED: {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"},
    BatchStatus.EXPIRED: {
        "code": "batch_expired",
        "message": "this request could not be executed before the completion window expired",
    },
}


def batch_finalize(*, batch_pk: int, runner: str = "") -> Batch:
    """End the batch: its unrun lines failed (cancelled or expired), its output and error files written.

    Idempotent: a batch that has ended is returned as it is. Lines still running (their
    runner died) are recovered first, so none is left behind.
    """
    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(pk=batch_pk)
        if batch.status in TERMINAL:
            return batch
        for line in BatchLine.objects.filter(batch=batch, status=LineStatus.RUNNING).select_related("batch"):
            line_recover(line=line)
        now = timezone.now()
        pending = BatchLine.objects.filter(batch=batch, status=LineStatus.PENDING)
        if batch.status == BatchStatus.CANCELLING:
            final = BatchStatus.CANCELLED
        elif pending.exists() and batch.expires_at <= now:
            final = BatchStatus.EXPIRED
        elif pending.exists():
            raise BatchStateConflict(f"batch {batch.public_id} still has lines to run")
        else:
            final = BatchStatus.COMPLETED
        stopped = pending.update(status=LineStatus.FAILED, error=STOPPED_ERRORS.get(final), finished_at=now)
        batch.failed = F("failed") + stopped
        batch.status, batch.finalizing_at = BatchStatus.FINALIZING, now
        batch.save(update_fields=["failed", "status", "finalizing_at"])
        batch.refresh_from_db()
        output, errors = _result_files(batch)
        batch.output_file, batch.error_file = output, errors
        batch.status = final
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at"}.get(final, "expired_at")
        setattr(batch, stamp, timezone.now())
        batch.runner = ""
        batch.save(update_fields=["output_file", "error_file", "status", stamp, "runner"])
    return batch


def _result_files(batch: Batch) -> tuple[BatchFile | None, BatchFile | None]:
    """The output file (answered lines) and the error file (the rest), in input order, in OpenAI's format."""
    out: list[bytes] = []
    err: list[bytes] = []
    for line in BatchLine.objects.filter(batch=batch).order_by("number").iterator():
        (out if line.status == LineStatus.COMPLETED else err).append(
            json.dumps(result_entry(batch, line), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        )
    return _result_file(batch, "output", out), _result_file(batch, "errors", err)


def _result_file(batch: Batch, kind: str, rows: list[bytes]) -> BatchFile | None:
    if not rows:
        return None
    content = b"".join(rows)
    name = f"{batch.public_id}_{kind}.jsonl"
    stored = storage.store(name=f"batch-files/{batch.tenant_id}/{name}", content=content)
    return BatchFile.objects.create(
        tenant_id=batch.tenant_id,
        purpose=FilePurpose.BATCH_OUTPUT,
        filename=name,
        bytes=len(content),
        lines=len(rows),
        storage_name=stored,
    )


def result_entry(batch: Batch, line: BatchLine) -> dict:
    """One line of an output or error file: ``{"id", "custom_id", "response": {...} | null, "error": {...} | null}``."""
    response = None
    if line.status_code is not None:
        response = {"status_code": line.status_code, "request_id": line.request_id, "body": line.body}
    return {
        "id": f"batch_req_{batch.public_id.removeprefix('batch_')}_{line.number}",
        "custom_id": line.custom_id or None,
        "response": response,
        "error": line.error,
    }
