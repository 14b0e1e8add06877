"""Rollups of the ledger (``tenants.UsageRecord``): one row per tenant, window, tier, source and split value.

Derived data: ``dashboards.services.rollup_window`` rebuilds a window's rows from the
ledger whenever it runs (delete + insert in one transaction), so nothing here is ever
edited by hand and a rollup row can always be thrown away and recomputed.

Amounts are integers in fixed units (money in nano-units, 1e-9, the ledger's
``decimal_places``; drafted tokens and GPU milliseconds in thousandths): integer sums
are exact on every backend, where SQLite would sum ``DecimalField`` columns as floats.

One table serves every split: ``dimension`` says what ``value`` is (``total``: nothing,
one row per tier and source; ``model``: model, verifier and draft versions; ``api_key``
and ``user``: an id or "" for none; ``tag``: one ``key=value`` pair of the request's tags).
A page reads one dimension at a time through the ``(tenant, granularity, dimension,
bucket)`` index, so the tag and user rows never slow the totals down; a ledger row with
several tags counts once per tag, so tag rows are never summed across values.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class Granularity(models.TextChoices):
    HOUR = "hour"
    DAY = "day"


class Dimension(models.TextChoices):
    TOTAL = "total"
    MODEL = "model"
    API_KEY = "api_key"
    USER = "user"
    TAG = "tag"


# The integer measures of a rollup row, in the order services and selectors handle them.
MEASURES: tuple[str, ...] = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "drafted_milli",
    "accepted_tokens",
    "gpu_milli",
    "cost_edge_nanos",
    "cost_verifier_nanos",
    "cost_cloud_nanos",
    "cost_total_nanos",
    "saving_nanos",
)


class CostRollup(models.Model):
    """The ledger's sums for one tenant over one closed window (``bucket`` .. ``bucket`` + granularity)."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    granularity = models.CharField(max_length=8, choices=Granularity.choices)
    bucket = models.DateTimeField(help_text="the window's start (UTC)")
    dimension = models.CharField(max_length=16, choices=Dimension.choices)
    value = models.CharField(max_length=600, blank=True)
    route_tier = models.CharField(max_length=16)
    source = models.CharField(max_length=16)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    drafted_milli = models.BigIntegerField(default=0)
    accepted_tokens = models.BigIntegerField(default=0)
    gpu_milli = models.BigIntegerField(default=0)
    cost_edge_nanos = models.BigIntegerField(default=0)
    cost_verifier_nanos = models.BigIntegerField(default=0)
    cost_cloud_nanos = models.BigIntegerField(default=0)
    cost_total_nanos = models.BigIntegerField(default=0)
    saving_nanos = models.BigIntegerField(default=0)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "granularity", "dimension", "bucket"], name="cost_rollup_read"),
            models.Index(fields=["granularity", "bucket"], name="cost_rollup_window"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "granularity", "bucket", "dimension", "value", "route_tier", "source"],
                name="cost_rollup_unique_cell",
            ),
            models.CheckConstraint(condition=Q(granularity__in=Granularity.values), name="cost_rollup_granularity"),
            models.CheckConstraint(condition=Q(dimension__in=Dimension.values), name="cost_rollup_dimension"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.dimension}={self.value}"


class RollupMark(models.Model):
    """How far the rollups of one granularity reach: every window ending at or before ``rolled_until`` is rolled up.

    Pages read rollups before it and raw ledger rows from it on, so the figures are right
    whether or not the periodic task has run lately.
    """

    granularity = models.CharField(max_length=8, choices=Granularity.choices, unique=True)
    rolled_until = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.granularity} rollups until {self.rolled_until:%Y-%m-%d %H:%M}"
