"""SLO data: tenants' objectives, rollups of SLO samples, the rollup watermarks, alerts and their webhook."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from slo.counts import COLUMNS
from slo.objectives import LatencyClass, ObjectiveKind


class SloObjective(models.Model):
    """A tenant's own objective for one latency class and kind; the platform default applies where it has none."""

    Kind = ObjectiveKind

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="slo_objectives")
    latency_class = models.CharField(max_length=16, choices=LatencyClass.choices)
    kind = models.CharField(max_length=16, choices=ObjectiveKind.choices)
    threshold_ms = models.PositiveIntegerField(null=True, blank=True, help_text="latency kinds: a histogram edge")
    target = models.FloatField(help_text="the share of requests that must be good, e.g. 0.99")
    window_days = models.PositiveSmallIntegerField(default=28)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "latency_class", "kind"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "latency_class", "kind"], name="slo_objective_unique"),
            models.CheckConstraint(condition=Q(target__gt=0) & Q(target__lt=1), name="slo_objective_target_share"),
            models.CheckConstraint(
                condition=Q(window_days__gte=1) & Q(window_days__lte=90), name="slo_objective_window_days"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.latency_class} {self.kind} {self.target}"


class SloRollup(models.Model):
    """What a tenant's samples of one class and tier count for over one closed 5-minute or 1-hour bucket."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="slo_rollups")
    resolution_s = models.PositiveIntegerField(help_text="300 or 3600")
    bucket_start = models.DateTimeField()
    latency_class = models.CharField(max_length=16)
    route_tier = models.CharField(max_length=16)
    # and one integer column per name of slo.counts.COLUMNS (added below)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "resolution_s", "bucket_start", "latency_class", "route_tier"],
                name="slo_rollup_unique",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "resolution_s", "bucket_start"]),
            models.Index(fields=["resolution_s", "bucket_start"]),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.resolution_s}s {self.bucket_start:%Y-%m-%d %H:%M} {self.route_tier}"


for _column in COLUMNS:
    SloRollup.add_to_class(_column, models.PositiveIntegerField(default=0))


class SloRollupWatermark(models.Model):
    """Rollups of one resolution hold every bucket before ``closed_until``; pages read raw samples after it."""

    resolution_s = models.PositiveIntegerField(unique=True)
    closed_until = models.DateTimeField()
    # 5-minute one: the highest sample id seen by the last run; a later one created before
    # ``closed_until`` was inserted late (a seed) and its buckets are rolled up again
    seen_sample_id = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.resolution_s}s until {self.closed_until:%Y-%m-%d %H:%M}"


class AlertKind(models.TextChoices):
    SOFT_BUDGET = "soft_budget", "soft budget reached"
    FAST_BURN = "fast_burn", "fast burn"
    SLOW_BURN = "slow_burn", "slow burn"
    TIER_DOWN = "tier_down", "tier down"


class Alert(models.Model):
    """One firing of a rule for a tenant, from fired to resolved; at most one open per (tenant, kind, key)."""

    Kind = AlertKind

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    key = models.CharField(max_length=100, help_text="what fired: an objective, a tier, a budget")
    fired_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    details = models.JSONField(default=dict)
    # the webhook: each transition is posted once; a failed post is tried again at the next evaluation
    fired_sent_at = models.DateTimeField(null=True, blank=True)
    resolved_sent_at = models.DateTimeField(null=True, blank=True)
    send_error = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-fired_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "kind", "key"], condition=Q(resolved_at__isnull=True), name="slo_alert_one_open"
            ),
            models.CheckConstraint(condition=Q(kind__in=AlertKind.values), name="slo_alert_kind_valid"),
        ]
        indexes = [models.Index(fields=["tenant", "resolved_at"])]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.kind} {self.key} {'resolved' if self.resolved_at else 'firing'}"

    @property
    def firing(self) -> bool:
        return self.resolved_at is None


class AlertWebhook(models.Model):
    """Where a tenant's alerts are posted (else ``TANDEM_ALERT_WEBHOOK_URL``, the platform's)."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="alert_webhook")
    url = models.URLField(max_length=500, blank=True, help_text="empty: the platform's webhook, if any")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.tenant_id} -> {self.url or '(platform)'}"
