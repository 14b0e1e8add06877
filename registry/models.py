"""Model versions (drafts and verifiers), the rollouts that bring a new draft into service, and tenants' pins.

A :class:`ModelVersion` is one set of weights a public model id may be served with; its
``version`` is the string the ledger records (``inference.engines.file_version``: file
name and the first 12 hex digits of its sha256). At most one version per model and role
is ``current``: the one new sessions get unless a canary or a tenant's pin says otherwise.
A :class:`Rollout` takes a submitted draft through convert -> validate -> evaluate ->
canary -> promote or roll back; each step is a :class:`RolloutStep` row with its timings
and figures.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tenants.models import Tenant


class ModelRole(models.TextChoices):
    DRAFT = "draft"
    VERIFIER = "verifier"


class ModelFormat(models.TextChoices):
    GGUF = "gguf"
    TRANSFORMERS = "transformers"


class VersionStatus(models.TextChoices):
    REGISTERED = "registered"  # known, not serving
    CANDIDATE = "candidate"  # in a rollout
    CURRENT = "current"  # what new sessions get
    RETIRED = "retired"  # was current, replaced by a promotion
    REJECTED = "rejected"  # a rollout found it unfit or rolled it back


class ModelVersion(models.Model):
    Role = ModelRole
    Format = ModelFormat
    Status = VersionStatus

    model = models.CharField(max_length=200, help_text="the public model id it serves (GET /v1/models)")
    role = models.CharField(max_length=16, choices=ModelRole.choices)
    version = models.CharField(max_length=200, help_text="what the ledger records: name@sha256[:12]")
    source = models.CharField(max_length=500, help_text="a file or folder path, or a hub id")
    format = models.CharField(max_length=16, choices=ModelFormat.choices)
    content_hash = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the weights (every file of a folder, sorted)"
    )
    tokenizer_hash = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the token list, by id, padding ids left out"
    )
    quantisation = models.CharField(max_length=32, default="f32")
    size_bytes = models.BigIntegerField(default=0)
    # provenance
    training_data = models.TextField(blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    conversion = models.JSONField(default=dict, blank=True, help_text="how it was made from its parent")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=16, choices=VersionStatus.choices, default=VersionStatus.REGISTERED)

    class Meta:
        ordering = ["model", "role", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["model", "role", "version"], name="registry_version_unique"),
            # one version serves new sessions by default: two "current" drafts would be a coin toss
            models.UniqueConstraint(
                fields=["model", "role"], condition=Q(status="current"), name="registry_one_current_per_role"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.role} {self.version} ({self.status})"


class RolloutStatus(models.TextChoices):
    RUNNING = "running"  # convert, validate, evaluate
    CANARY = "canary"  # a share of live traffic gets the candidate
    PAUSED = "paused"  # the canary stopped sending traffic to the candidate, waiting for an operator
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # a step before the canary found the candidate unfit


FINISHED_ROLLOUT = (RolloutStatus.PROMOTED, RolloutStatus.ROLLED_BACK, RolloutStatus.FAILED)


class Rollout(models.Model):
    Status = RolloutStatus

    model = models.CharField(max_length=200)
    source_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    candidate = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="rollouts", help_text="GGUF served"
    )
    baseline = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+", help_text="current draft")
    status = models.CharField(max_length=16, choices=RolloutStatus.choices, default=RolloutStatus.RUNNING)
    step = models.CharField(max_length=16, blank=True, help_text="the step running or last run")
    quantisation = models.CharField(max_length=16, blank=True, help_text="llama.cpp quantisation after convert")
    canary_share = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0.100"),
        validators=[MinValueValidator(Decimal("0.001")), MaxValueValidator(Decimal("1"))],
    )
    canary_min_samples = models.PositiveIntegerField(default=20, help_text="completions per version before deciding")
    min_eval_ratio = models.DecimalField(
        max_digits=4, decimal_places=3, default=Decimal("0.900"), help_text="evaluate: candidate/current acceptance"
    )
    max_canary_drop = models.DecimalField(
        max_digits=4, decimal_places=3, default=Decimal("0.100"), help_text="canary: acceptance may fall this much"
    )
    auto_promote = models.BooleanField(default=True)
    decision = models.TextField(blank=True, help_text="why it was promoted, rolled back or failed")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    canary_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(canary_share__gt=0) & Q(canary_share__lte=1), name="registry_canary_share_range"
            ),
            # one rollout at a time per model: two canaries would split traffic three ways
            models.UniqueConstraint(
                fields=["model"],
                condition=Q(status__in=["running", "canary", "paused"]),
                name="registry_one_active_rollout",
            ),
        ]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_ROLLOUT

    def __str__(self) -> str:
        return f"rollout {self.pk} of {self.model}: {self.status}"


class StepStatus(models.TextChoices):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    WAITING = "waiting"  # the canary, collecting samples


class RolloutStep(models.Model):
    Status = StepStatus

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=16)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    figures = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["rollout", "id"]

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else (self.finished_at - self.started_at).total_seconds()


class TenantModelPin(models.Model):
    """A tenant's choice of draft version for a model: its new sessions get it, whatever is current or on canary."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="pins")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "model"], name="registry_one_pin_per_model")]
