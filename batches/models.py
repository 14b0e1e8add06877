"""Batch jobs as OpenAI's Batch API has them: files, batches, and one row per request line.

A ``BatchLine`` is the unit of progress: a worker claims a line before it runs it and
records its answer when it ends, so a restarted worker resumes where the last one stopped
and never runs a finished line again. Each line's gateway request id is derived from its
batch's and its own number (``BatchLine.request_id_for``): the reservation and the ledger
hold request ids unique, so a line can never be charged twice.
"""

from __future__ import annotations

import secrets

from django.db import models
from django.db.models import Q

from tenants.models import ApiKey, Tenant


def _public_id(prefix: str) -> str:
    # Unguessable: a line's request id embeds its batch's id, and no other tenant may take it first.
    return f"{prefix}{secrets.token_hex(12)}"


def new_file_id() -> str:
    return _public_id("file-")


def new_batch_id() -> str:
    return _public_id("batch_")


class FilePurpose(models.TextChoices):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class BatchFile(models.Model):
    """A file of a tenant's: an uploaded batch input, or a batch's output or error file. Bytes live in storage."""

    Purpose = FilePurpose

    public_id = models.CharField(max_length=40, unique=True, default=new_file_id)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="batch_files")
    purpose = models.CharField(max_length=16, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField()
    lines = models.PositiveIntegerField(default=0)
    storage_name = models.CharField(max_length=255, help_text="the name in the batch file storage")
    created_at = models.DateTimeField(auto_now_add=True)
    # deleted by its tenant or past the retention period: its bytes are gone, and so is the file for the API
    # (the row stays: batches name their files)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-pk"]
        indexes = [models.Index(fields=["tenant", "-id"], name="batch_file_tenant_recent")]

    def __str__(self) -> str:
        return f"{self.public_id} ({self.filename})"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# a batch in one of these starts no more lines
TERMINAL = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class Batch(models.Model):
    Status = BatchStatus

    public_id = models.CharField(max_length=40, unique=True, default=new_batch_id)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="batches")
    # The key whose budget, limits and scopes every line runs under (re-checked when it runs).
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="batches")
    endpoint = models.CharField(max_length=64)
    completion_window = models.CharField(max_length=8, default="24h")
    input_file = models.ForeignKey(BatchFile, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error_file = models.ForeignKey(BatchFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    errors = models.JSONField(null=True, blank=True, help_text="why the whole batch failed (OpenAI's errors object)")
    metadata = models.JSONField(default=dict, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # the worker running it: a second delivery of its task leaves it alone while this is fresh
    runner = models.CharField(max_length=64, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-pk"]
        indexes = [models.Index(fields=["tenant", "-id"], name="batch_tenant_recent")]
        constraints = [
            models.CheckConstraint(condition=Q(completed__gte=0) & Q(failed__gte=0), name="batch_counts_nonnegative"),
            models.CheckConstraint(condition=Q(status__in=BatchStatus.values), name="batch_status_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} ({self.status})"


class LineStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class BatchLine(models.Model):
    """One request of a batch: its input, and once it ended its answer (or its error), as the output file has it."""

    Status = LineStatus

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    number = models.PositiveIntegerField(help_text="0-based line number in the input file")
    custom_id = models.CharField(max_length=512, blank=True)
    request = models.JSONField(null=True, blank=True, help_text="the parsed line (null: it was not valid JSON)")
    status = models.CharField(max_length=16, choices=LineStatus.choices, default=LineStatus.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="starts; each start has its own request id")
    request_id = models.CharField(max_length=100, blank=True, help_text="the gateway request id of the last start")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    body = models.JSONField(null=True, blank=True, help_text="the response body (or OpenAI's error body)")
    error = models.JSONField(null=True, blank=True, help_text="a line that never reached the gateway: code, message")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "number"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "number"], name="batch_line_unique_number"),
            models.CheckConstraint(condition=Q(status__in=LineStatus.values), name="batch_line_status_valid"),
        ]
        indexes = [models.Index(fields=["batch", "status"], name="batch_line_status")]

    def __str__(self) -> str:
        return f"{self.batch_id}#{self.number} ({self.status})"

    @staticmethod
    def request_id_for(batch_public_id: str, number: int, attempt: int) -> str:
        """The gateway request id of a line's ``attempt``-th start (1-based): unique, and no client can send it first."""
        base = f"{batch_public_id}_{number}"
        return base if attempt <= 1 else f"{base}.{attempt}"
